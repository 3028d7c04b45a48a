"""Moving-statistics update of each framework, as data plus one dispatcher.

Every convention is the same exponential moving average

    new = (1 - w) * old + w * batch_stat

and differs only in (a) how its ``momentum`` argument maps to the weight ``w`` on the
*new* value, (b) whether the variance fed in is the biased batch variance or Bessel's
unbiased ``var * m / (m - 1)``, and (c) whether early steps are de-biased by a counter
(PyTorch ``momentum=None``, Caffe's scale factor). Values are cited from each framework's
own source; see SPEC.md for the full table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from spec._checks import as_float_array, batch_counter, non_negative_counts, non_negative_variance, real_number
from spec.moments import ACCUMULATOR


@dataclass(frozen=True)
class Convention:
    name: str
    framework: str
    #: "old": new = momentum*old + (1-momentum)*batch; "new": new = (1-momentum)*old + momentum*batch.
    momentum_weights: Literal["old", "new"]
    default_momentum: float
    default_eps: float
    #: Which batch variance enters the running average (normalization always uses the biased one).
    running_variance: Literal["biased", "unbiased"]
    #: "cumulative" (torch momentum=None), "scale_factor" (Caffe) or None.
    counter: Literal["cumulative", "scale_factor"] | None
    source: str
    note: str = ""


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            "keras",
            "Keras 3 keras.layers.BatchNormalization",
            "old",
            0.99,
            1e-3,
            "biased",
            None,
            "keras/src/layers/normalization/batch_normalization.py: "
            "moving_mean * momentum + mean * (1 - momentum); variance from ops.moments",
        ),
        Convention(
            "torch",
            "PyTorch torch.nn.BatchNorm1d/2d/3d",
            "new",
            0.1,
            1e-5,
            "unbiased",
            "cumulative",
            "torch/nn/modules/batchnorm.py (exponential_average_factor) and ATen "
            "batch_norm_cpu_update_stats_template: running_var uses var_sum / (n - 1)",
            "momentum=None averages cumulatively: w = 1 / num_batches_tracked after increment",
        ),
        Convention(
            "onnx",
            "ONNX BatchNormalization-14/15, training_mode=1",
            "old",
            0.9,
            1e-5,
            "biased",
            None,
            "onnx/reference/ops/op_batch_normalization.py _batchnorm_training_mode: "
            "running = input * momentum + current * (1 - momentum), current_var = x.var()",
        ),
        Convention(
            "tf1",
            "TF1 tf.layers.batch_normalization / tf.contrib.layers.batch_norm (fused)",
            "old",
            0.99,
            1e-3,
            "unbiased",
            None,
            "FusedBatchNormV3 (the default for 4-D inputs) returns a Bessel-corrected "
            "batch_variance for the moving average; assign_moving_average: v -= (v - value) * (1 - decay)",
            "tf.contrib.layers.batch_norm defaults decay=0.999; the non-fused path fed the biased variance",
        ),
        Convention(
            "caffe",
            "Caffe BatchNorm layer (moving_average_fraction)",
            "old",
            0.999,
            1e-5,
            "unbiased",
            "scale_factor",
            "caffe/src/caffe/layers/batch_norm_layer.cpp: blobs are sums scaled by s <- f * s + 1, "
            "variance times m / (m - 1); inference divides by s (use_global_stats)",
            "stats here are the normalized values blob / s; see spec.caffe_blobs",
        ),
        Convention(
            "d2l",
            "Dive into Deep Learning, BatchNorm from scratch (PyTorch tab)",
            "new",
            0.9,
            1e-5,
            "biased",
            None,
            "d2l-en chapter_convolutional-modern/batch-norm.md: "
            "(1.0 - momentum) * moving_mean + momentum * mean, called with momentum=0.9",
            "the TensorFlow tab weights the old value by 0.9 instead (that is the 'keras' form)",
        ),
    )
}

DEFAULT = object()  # sentinel: "use the convention's default momentum"


def get_convention(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown convention {name!r}; known: {', '.join(CONVENTIONS)}") from None


def list_conventions() -> list[Convention]:
    """All conventions with their defaults, in a stable order."""
    return list(CONVENTIONS.values())


def _check_momentum(conv: Convention, momentum) -> float | None:
    if momentum is None:
        if conv.counter != "cumulative":
            raise ValueError(f"momentum=None (cumulative average) is only defined for 'torch', not {conv.name!r}")
        return None
    try:
        value = real_number(momentum, "momentum")
    except ValueError:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum for convention {conv.name!r} must be in [0, 1], got {value}")
    return value


def _caffe_scale_factor(f: float, n: int) -> float:
    """Caffe's scale factor after n batches, s_n = sum_{k<n} f^k = (1 - f^n) / (1 - f).

    Written as -expm1(n * log1p(-d)) / d with d = 1 - f (exact for f >= 0.5): the textbook form
    loses ~1e-16 / (n * d) relative to cancellation in 1 - f^n, i.e. 1e-11 for f = 0.99999.
    """
    if f == 1.0:
        return float(n)
    if f == 0.0:  # only the newest batch counts (0^0 = 1)
        return 1.0 if n > 0 else 0.0
    d = 1.0 - f
    return -math.expm1(n * math.log1p(-d)) / d


def new_value_weight(conv: Convention, momentum: float | None, num_batches_tracked=None) -> float:
    """The weight ``w`` on the batch statistic in ``new = (1 - w) * old + w * batch``."""
    if momentum is None and conv.counter != "cumulative":
        raise ValueError(f"momentum=None (cumulative average) is only defined for 'torch', not {conv.name!r}")
    # A counter that is given is checked even where unused: a float or negative count is a caller's bug.
    n = None if num_batches_tracked is None else batch_counter(num_batches_tracked)
    # torch's counter matters only for momentum=None; with a fixed momentum its weight is constant.
    if (momentum is None or conv.counter == "scale_factor") and n is None:
        raise ValueError(f"convention {conv.name!r} needs num_batches_tracked (batches seen before this one)")
    if momentum is None:  # torch cumulative: counter incremented first, then w = 1 / count
        return 1.0 / (n + 1)
    if conv.counter == "scale_factor":
        # Caffe keeps s_n = sum_{k<n} f^k; blob_new = f*blob + stat, s_new = f*s + 1, and the
        # stored statistic is blob / s. Dividing out gives w = 1 / (f * s_n + 1).
        f = momentum
        s = _caffe_scale_factor(f, n)
        return 1.0 / (f * s + 1.0)
    return momentum if conv.momentum_weights == "new" else 1.0 - momentum


def update_running_stats(
    running_mean,
    running_var,
    batch_mean,
    batch_var,
    count,
    *,
    convention: str,
    momentum=DEFAULT,
    num_batches_tracked: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One moving-statistics update in the named convention.

        var_in = batch_var * count / (count - 1)   if the convention is unbiased, else batch_var
        new_mean = (1 - w) * running_mean + w * batch_mean
        new_var  = (1 - w) * running_var  + w * var_in

    ``batch_var`` is the biased variance from :func:`spec.batch_norm_train`; ``count`` the
    number of values per channel. ``w`` comes from :func:`new_value_weight`. For
    ``torch`` with ``momentum=None`` and for ``caffe``, ``num_batches_tracked`` is the
    number of batches seen *before* this one. Arithmetic in float64.

    ``count=0`` (an empty batch, SPEC.md §9) returns the running statistics unchanged, as
    PyTorch does; the caller's counter follows PyTorch too (torch's ``num_batches_tracked``
    still increments; Caffe's scale factor does not, see SPEC.md).
    """
    conv = get_convention(convention)
    momentum = _check_momentum(conv, conv.default_momentum if momentum is DEFAULT else momentum)
    running_mean = as_float_array(running_mean, "running_mean").astype(ACCUMULATOR)
    running_var = as_float_array(running_var, "running_var").astype(ACCUMULATOR)
    batch_mean = as_float_array(batch_mean, "batch_mean").astype(ACCUMULATOR)
    batch_var = as_float_array(batch_var, "batch_var").astype(ACCUMULATOR)
    shape = running_mean.shape
    for name, arr in (("running_var", running_var), ("batch_mean", batch_mean), ("batch_var", batch_var)):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} like running_mean, got {arr.shape}")
    non_negative_variance(running_var, "running_var")
    non_negative_variance(batch_var, "batch_var")
    count = non_negative_counts(count, "count")
    if count.shape not in ((), shape):
        raise ValueError(f"count must be a scalar or have shape {shape} like running_mean, got {count.shape}")
    # count 0 is an empty batch (SPEC.md §9): that channel's statistics stay as they are.
    empty = count == 0
    if conv.running_variance == "unbiased":
        if np.any((count <= 1) & ~empty):
            raise ValueError(
                f"an unbiased running variance ({conv.name!r}) needs count > 1 (or 0, an empty batch), got {count}"
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            batch_var = batch_var * count / (count - 1.0)
    elif np.any((count < 1) & ~empty):
        raise ValueError(f"count must be >= 1 (or 0, an empty batch), got {count}")
    w = new_value_weight(conv, momentum, num_batches_tracked)
    if not np.any(empty):
        return (1.0 - w) * running_mean + w * batch_mean, (1.0 - w) * running_var + w * batch_var
    # An empty batch's statistics are NaN (no values): select, don't multiply by w = 0.
    with np.errstate(invalid="ignore"):
        new_mean = np.where(empty, running_mean, (1.0 - w) * running_mean + w * batch_mean)
        new_var = np.where(empty, running_var, (1.0 - w) * running_var + w * batch_var)
    return new_mean, new_var


def convert_momentum(value: float, src: str, dst: str) -> float:
    """Express ``momentum`` of convention ``src`` as the equivalent value in ``dst``.

    Equivalent means the same steady-state weight on the new batch: Keras 0.99 <-> torch 0.01.
    Only the weight is converted; the variance estimator (biased/unbiased) differs between
    some conventions and is *not* something a momentum can absorb.
    """
    src_conv, dst_conv = get_convention(src), get_convention(dst)
    value = _check_momentum(src_conv, value)
    if value is None:
        raise ValueError("momentum=None (cumulative average) has no fixed-momentum equivalent")
    w = value if src_conv.momentum_weights == "new" else 1.0 - value
    return w if dst_conv.momentum_weights == "new" else 1.0 - w


def caffe_blobs(mean, var, num_batches_tracked: int, moving_average_fraction: float = 0.999):
    """Caffe's raw BatchNorm blobs ``(mean_sum, var_sum, scale_factor)`` from normalized stats."""
    conv = get_convention("caffe")
    f = _check_momentum(conv, moving_average_fraction)
    n = batch_counter(num_batches_tracked)
    s = _caffe_scale_factor(f, n)
    return np.asarray(mean, ACCUMULATOR) * s, np.asarray(var, ACCUMULATOR) * s, s
