"""keras-bn's framework-agnostic specification of Batch Normalization, in NumPy.

Every implementation in this project (Keras layer, PyTorch reference, ONNX graphs) is
tested against these functions; SPEC.md is the normative text they implement. The formulas
(``shifted_moments``, ``backward_closed_form`` and its coefficient form, ``batch_norm_tangent``, ``inference_affine``,
``normalize``, ``new_value_weight``, ``variance_for_update``, ``moving_average``) take an array namespace
``xp`` (numpy by default, ``keras.ops``, ``torch``): the layers call them on their own tensors.
"""

from spec.arrays import identity, namespace
from spec.batch_norm import (
    backward_closed_form,
    backward_coefficient_form,
    backward_coefficients,
    batch_norm_backward,
    batch_norm_infer,
    batch_norm_jvp,
    batch_norm_tangent,
    batch_norm_train,
    inference_affine,
    normalize,
)
from spec.conventions import (
    CONVENTIONS,
    DEFAULT,
    Convention,
    Hyperparameters,
    biased_variance,
    caffe_blobs,
    check_hyperparameters,
    convert_momentum,
    get_convention,
    list_conventions,
    moving_average,
    needs_counter,
    new_value_weight,
    update_running_stats,
    variance_for_update,
)
from spec.moments import (
    REFINE_WHEN_NEEDED,
    ShiftedMoments,
    merge_moments,
    moments,
    refinement_matters,
    safe_count,
    shifted_moments,
)

__all__ = [
    "CONVENTIONS",
    "DEFAULT",
    "REFINE_WHEN_NEEDED",
    "Convention",
    "Hyperparameters",
    "ShiftedMoments",
    "backward_closed_form",
    "backward_coefficient_form",
    "backward_coefficients",
    "batch_norm_backward",
    "batch_norm_infer",
    "batch_norm_jvp",
    "batch_norm_tangent",
    "batch_norm_train",
    "biased_variance",
    "caffe_blobs",
    "check_hyperparameters",
    "convert_momentum",
    "get_convention",
    "identity",
    "inference_affine",
    "list_conventions",
    "merge_moments",
    "moments",
    "moving_average",
    "namespace",
    "needs_counter",
    "new_value_weight",
    "normalize",
    "refinement_matters",
    "safe_count",
    "shifted_moments",
    "update_running_stats",
    "variance_for_update",
]
