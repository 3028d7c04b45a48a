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

import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from spec._checks import (
    as_float_array,
    batch_counter,
    non_negative_counts,
    non_negative_variance,
    positive_eps,
    real_number,
)
from spec.arrays import namespace
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


class Hyperparameters(NamedTuple):
    """Validated hyperparameters: the convention's record, momentum (None: torch's cumulative average), eps."""

    convention: Convention
    momentum: float | None
    eps: float


def check_hyperparameters(convention: str, momentum=DEFAULT, eps=DEFAULT, *, eps_name: str = "eps") -> Hyperparameters:
    """The one check of (convention, momentum, eps) every implementation runs; defaults from the convention.

    A ``ValueError`` names the problem: an unknown convention, a momentum that is not a number
    in [0, 1] (SPEC.md §5), ``None`` where the convention has no cumulative average, an ``eps``
    that is not a finite number > 0 (SPEC.md §1). ``eps_name`` is eps's name in the caller's API
    (``epsilon`` in Keras), so the message names the argument the user passed.
    """
    conv = get_convention(convention)
    momentum = _check_momentum(conv, conv.default_momentum if momentum is DEFAULT else momentum)
    eps = positive_eps(conv.default_eps if eps is DEFAULT else eps, eps_name)
    return Hyperparameters(conv, momentum, eps)


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


def _caffe_scale_factor(f: float, n, xp=None):
    """Caffe's scale factor after n batches, s_n = sum_{k<n} f^k = (1 - f^n) / (1 - f).

    Written as -expm1(n * log1p(-d)) / d with d = 1 - f (exact for f >= 0.5): the textbook form
    loses ~1e-16 / (n * d) relative to cancellation in 1 - f^n, i.e. 1e-11 for f = 0.99999.
    ``n`` is an int (xp None) or a float tensor of namespace ``xp``.
    """
    if f == 1.0:
        return float(n) if xp is None else n
    if f == 0.0:  # only the newest batch counts (0^0 = 1); w = 1 / (0 * s + 1) = 1 whatever s is
        return (1.0 if n > 0 else 0.0) if xp is None else 0.0 * n
    d = 1.0 - f
    if xp is None:
        return -math.expm1(n * math.log1p(-d)) / d
    return -namespace(xp).expm1(n * math.log1p(-d)) / d


def needs_counter(conv: Convention, momentum: float | None) -> bool:
    """Whether the weight depends on the number of batches seen (torch ``momentum=None``, Caffe)."""
    return momentum is None or conv.counter == "scale_factor"


def new_value_weight(conv: Convention, momentum: float | None, num_batches_tracked=None, *, xp=None):
    """The weight ``w`` on the batch statistic in ``new = (1 - w) * old + w * batch`` (SPEC.md §5).

        keras, onnx, tf1, caffe-free forms:  w = 1 - momentum ("old")  or  w = momentum ("new")
        torch momentum=None:                  w = 1 / (n + 1)
        caffe (f = momentum):                 w = 1 / (f * s_n + 1),  s_n = -expm1(n * log1p(-(1 - f))) / (1 - f)

    ``n = num_batches_tracked`` counts the batches seen before this one. With ``xp`` None or numpy
    it is an integer and ``w`` a Python float; with another namespace (``keras.ops``, ``torch``) it
    may be a float tensor (cast it to the precision wanted: float64 keeps Caffe's 1 - f^n exact to
    1e-16) and ``w`` is a tensor where it depends on it.
    """
    if momentum is None and conv.counter != "cumulative":
        raise ValueError(f"momentum=None (cumulative average) is only defined for 'torch', not {conv.name!r}")
    if not needs_counter(conv, momentum):
        if num_batches_tracked is not None and namespace(xp).xp is np:
            batch_counter(num_batches_tracked)  # a float or negative count is a caller's bug, even where unused
        return momentum if conv.momentum_weights == "new" else 1.0 - momentum
    if num_batches_tracked is None:
        raise ValueError(f"convention {conv.name!r} needs num_batches_tracked (batches seen before this one)")
    if namespace(xp).xp is np:
        n = batch_counter(num_batches_tracked)
        scale_factor = _caffe_scale_factor
    else:
        n = num_batches_tracked
        scale_factor = functools.partial(_caffe_scale_factor, xp=xp)
    if momentum is None:  # torch cumulative: counter incremented first, then w = 1 / count
        return 1.0 / (n + 1.0)
    # Caffe keeps s_n = sum_{k<n} f^k; blob_new = f*blob + stat, s_new = f*s + 1, and the
    # stored statistic is blob / s. Dividing out gives w = 1 / (f * s_n + 1).
    f = momentum
    return 1.0 / (f * scale_factor(f, n) + 1.0)


def variance_for_update(conv: Convention, var, count, *, xp=None):
    """The variance a convention feeds its moving average (SPEC.md §5): the biased batch variance,
    or Bessel's unbiased ``var * m / (m - 1)`` where the convention stores that.

    ``count`` is ``m``, values per channel. Where ``m <= 1`` the unbiased form is undefined: the
    factor there is finite but meaningless, and callers leave such channels unchanged.
    """
    if conv.running_variance == "biased":
        return var
    if isinstance(count, int | float):  # a Python number (torch_ref): no tensor ops for the factor
        return var * count / (count - 1.0 if count > 1.0 else 1.0)
    ns = namespace(xp)
    return var * count / ns.where(count > 1.0, count - 1.0, 1.0)


def biased_variance(unbiased_var, count, *, xp=None):
    """The inverse of :func:`variance_for_update`'s Bessel factor: ``var * (m - 1) / m``, for kernels
    (TensorFlow's FusedBatchNormV3) that return the unbiased variance where spec wants the biased one."""
    return unbiased_var * ((count - 1.0) / count)


def moving_average(old, batch, weight):
    """``new = (1 - w) * old + w * batch``: every convention's update (SPEC.md §5), any namespace."""
    return (1.0 - weight) * old + weight * batch


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
    conv, momentum, _ = check_hyperparameters(convention, momentum)
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
        with np.errstate(invalid="ignore"):
            batch_var = variance_for_update(conv, batch_var, count)
    elif np.any((count < 1) & ~empty):
        raise ValueError(f"count must be >= 1 (or 0, an empty batch), got {count}")
    w = new_value_weight(conv, momentum, num_batches_tracked)
    new_mean, new_var = moving_average(running_mean, batch_mean, w), moving_average(running_var, batch_var, w)
    if not np.any(empty):
        return new_mean, new_var
    # An empty batch's statistics are NaN (no values): select, don't multiply by w = 0.
    return np.where(empty, running_mean, new_mean), np.where(empty, running_var, new_var)


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
