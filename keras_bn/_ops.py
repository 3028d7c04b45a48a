"""Backend-agnostic BN math for the Keras layer, in ``keras.ops``: the spec's formulas, once.

Each function mirrors a function of :mod:`spec` (same formula, same convention table read
from :func:`spec.get_convention`), in float32 tensors instead of float64 arrays:

- :func:`moments` mirrors :func:`spec.moments` (two passes, masked values selected out);
- :func:`normalize_batch` is :func:`spec.batch_norm_train`'s normalization with
  :func:`spec.batch_norm_backward`'s closed-form gradient;
- :func:`new_value_weight` and :func:`update_running_stats` mirror the spec functions of
  the same name (the moving-average update of every convention);
- :func:`scale_and_shift` is :func:`spec.batch_norm_infer`'s ``y = gamma * x_hat + beta``;
- :func:`renorm_correction` and :func:`renorm_update` port Keras 3.15's batch
  renormalization (Ioffe 2017), which the spec does not cover.

The layer (``keras_bn.layer``) holds state and decides *when* to call these; the fused
TensorFlow kernel (``keras_bn._fused``) replaces :func:`moments` + :func:`scale_and_shift`
where it applies, and its statistics are fed to the same :func:`update_running_stats`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from keras import ops

import spec
from spec.conventions import Convention


def validate_hyperparameters(convention: str, momentum, epsilon: float) -> Convention:
    """Ask the spec whether (convention, momentum, epsilon) is valid; return the convention.

    The spec is the one authority on valid values, so the layer raises exactly the spec's
    ``ValueError`` (unknown convention, momentum outside [0, 1], ``None`` momentum where
    no cumulative average exists, eps <= 0) by running it on a one-channel dummy.
    """
    conv = spec.get_convention(convention)
    one = np.ones(1)
    spec.update_running_stats(one, one, one, one, 2.0, convention=convention, momentum=momentum, num_batches_tracked=0)
    spec.batch_norm_infer(np.zeros((1, 1)), one, one, one, one, axis=1, eps=epsilon)
    return conv


def needs_counter(conv: Convention, momentum: float | None) -> bool:
    """Whether the update needs the number of batches seen (torch cumulative, Caffe)."""
    return momentum is None or conv.counter == "scale_factor"


class Moments(NamedTuple):
    """Batch statistics per channel, plus what :func:`normalize_batch` needs to use them exactly."""

    count: Any  # (C,) values per channel (mask weight where masked)
    mean: Any  # (C,) = shift + delta
    var: Any  # (C,) biased
    shift: Any  # keepdims first-pass mean m0
    delta: Any  # keepdims correction mean(x - m0)
    weights: Any  # None, or the mask as 0/1 floats, broadcastable to x (channel axis of size 1)


def moments(x, axes: tuple[int, ...], mask=None) -> Moments:
    """Per-channel batch statistics of ``x`` over ``axes`` (biased variance), without gradient.

    Corrected two-pass algorithm (Chan, Golub & LeVeque 1983, eq. 1.7) in x's dtype
    (the layer passes float32 or float64)::

        m0 = mean(x)                     first pass, a constant shift
        d  = x - m0,   delta = mean(d),   q = mean(d^2)
        mean = m0 + delta,   var = q - delta^2   (clamped at 0)

    ``delta`` corrects the rounding error of ``m0``, which plain two-pass keeps: in float32,
    for x = 1e4 + 1e-2 * N(0, 1) it is ~1e-3, i.e. a 1% error in a variance of 1e-4. With a
    ``mask`` (broadcastable to ``x``, same rank; ``True`` = use the value; the layer applies
    Keras' rule for its rank-1-less masks first) masked positions are selected out of the sums,
    so a masked NaN cannot leak in. A channel with count 0
    gets mean 0, var 0. Gradients through the statistics are :func:`normalize_batch`'s job.
    """
    x = ops.stop_gradient(x)
    ndim = len(x.shape)
    channel = [a for a in range(ndim) if a not in axes]
    channels = math.prod(x.shape[a] for a in channel)
    if mask is None:
        weights = None
        m0 = ops.mean(x, axis=axes, keepdims=True)
        d = x - m0
        delta = ops.mean(d, axis=axes, keepdims=True)
        q = ops.mean(d * d, axis=axes, keepdims=True)
        count = ops.ones((channels,), dtype=x.dtype) * (ops.cast(ops.size(x), x.dtype) / channels)
    else:
        keep = ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(x))
        weights = ops.cast(keep, x.dtype)
        count_kd = ops.sum(weights, axis=axes, keepdims=True)
        safe = ops.maximum(count_kd, 1.0)
        m0 = ops.sum(ops.where(keep, x, 0.0), axis=axes, keepdims=True) / safe
        d = ops.where(keep, x - m0, 0.0)
        delta = ops.sum(d, axis=axes, keepdims=True) / safe
        q = ops.sum(d * d, axis=axes, keepdims=True) / safe
        count = ops.ones((channels,), dtype=x.dtype) * ops.reshape(count_kd, (-1,))
    var = ops.maximum(q - delta * delta, 0.0)
    return Moments(count, ops.reshape(m0 + delta, (-1,)), ops.reshape(var, (-1,)), m0, delta, weights)


def normalize_batch(x, stats: Moments, gamma, beta, epsilon: float, axis: int):
    """Training-mode ``y = gamma * x_hat + beta``, ``x_hat = ((x - m0) - delta) / sqrt(var + eps)``,
    differentiated as :func:`spec.batch_norm_backward` states (the statistics depend on x)::

        dbeta  = sum_i dy_i,     dgamma = sum_i dy_i * x_hat_i
        dx_i   = gamma / sigma * (dy_i - w_i / M * dbeta - w_i / M * x_hat_i * dgamma)

    with w the mask (1 without one) and M = sum_i w_i; sums run over every position, masked
    ones included, since Keras normalizes those too. ``(x - m0) - delta`` is ``x - mean``
    without re-rounding through ``mean``. One closed form instead of autodiff through the
    moments: two reductions and one elementwise pass for the backward.
    """
    shape = [1] * len(x.shape)
    shape[axis] = -1
    axes = tuple(a for a in range(len(x.shape)) if a != axis)
    var = ops.reshape(stats.var, shape)
    inv_sigma = ops.rsqrt(var + epsilon)
    gamma = ops.ones_like(stats.var) if gamma is None else gamma
    beta = ops.zeros_like(stats.var) if beta is None else beta
    shift, delta, weights = stats.shift, stats.delta, stats.weights

    @ops.custom_gradient
    def forward(x, gamma, beta):
        y = ((x - shift) - delta) * (inv_sigma * ops.reshape(gamma, shape)) + ops.reshape(beta, shape)

        def backward(*args, upstream=None):
            dy = args[0] if upstream is None else upstream  # TF passes dy; torch passes (*inputs, upstream=dy)
            x_hat = ((x - shift) - delta) * inv_sigma  # recomputed: cheaper than keeping a full-size tensor
            dbeta = ops.sum(dy, axis=axes, keepdims=True)
            dgamma = ops.sum(dy * x_hat, axis=axes, keepdims=True)
            if weights is None:
                m = ops.cast(ops.size(dy), dy.dtype) / ops.cast(ops.size(dbeta), dy.dtype)
                mean_dy, mean_dy_xhat = dbeta / m, dgamma / m
            else:
                w_over_m = weights / ops.maximum(ops.sum(weights, axis=axes, keepdims=True), 1.0)
                mean_dy, mean_dy_xhat = w_over_m * dbeta, w_over_m * dgamma
            dx = (ops.reshape(gamma, shape) * inv_sigma) * (dy - mean_dy - x_hat * mean_dy_xhat)
            return dx, ops.reshape(dgamma, (-1,)), ops.reshape(dbeta, (-1,))

        return y, backward

    return forward(x, gamma, beta)


def scale_and_shift(centered, var, gamma, beta, epsilon: float, axis: int):
    """``y = centered * gamma / sqrt(var + eps) + beta``, per channel along ``axis``.

    ``centered`` is ``x - mean`` (batch or moving mean); ``gamma``/``beta`` may be None
    (``scale=False`` / ``center=False``).
    """
    shape = [1] * len(centered.shape)
    shape[axis] = -1
    factor = ops.rsqrt(var + epsilon)
    if gamma is not None:
        factor = factor * gamma
    y = centered * ops.reshape(factor, shape)
    if beta is not None:
        y = y + ops.reshape(beta, shape)
    return y


def new_value_weight(conv: Convention, momentum: float | None, num_batches_tracked=None):
    """The weight ``w`` on the batch statistic, as :func:`spec.new_value_weight` defines it.

    A Python float where it is a constant; a float64 scalar tensor where it depends on the
    counter (torch ``momentum=None``: ``1 / (n + 1)``; Caffe: ``1 / (f * s_n + 1)`` with
    ``s_n = (1 - f^n) / (1 - f)``). float64 because ``1 - f^n`` for f = 0.999 cancels
    three digits; the result is cast to the statistics' dtype by the caller.
    """
    if not needs_counter(conv, momentum):
        return spec.new_value_weight(conv, momentum)
    n = ops.cast(num_batches_tracked, "float64")
    if momentum is None:
        return 1.0 / (n + 1.0)
    f = float(momentum)
    s = n if f == 1.0 else (1.0 - ops.power(ops.cast(f, "float64"), n)) / (1.0 - f)
    return 1.0 / (f * s + 1.0)


def update_running_stats(
    running_mean, running_var, batch_mean, batch_var, count, *, conv: Convention, momentum, num_batches_tracked=None
):
    """One moving-statistics update, :func:`spec.update_running_stats` in ``keras.ops``.

        var_in = batch_var * count / (count - 1)   if the convention is unbiased, else batch_var
        new = (1 - w) * old + w * batch            (w from :func:`new_value_weight`)

    Returns ``(new_mean, new_var, valid)``. Where the spec raises (count < 1, or count <= 1
    for an unbiased variance) a layer inside a graph cannot, so ``valid`` is False there and
    the statistics are returned unchanged: an empty or all-masked batch carries no information
    (and its statistics may be NaN, which a zero weight would not keep out: 0 * NaN = NaN).
    """
    dtype = running_mean.dtype
    batch_mean = ops.cast(batch_mean, dtype)
    batch_var = ops.cast(batch_var, dtype)
    count = ops.cast(count, dtype)
    if conv.running_variance == "unbiased":
        valid = count > 1.0
        batch_var = batch_var * count / ops.maximum(count - 1.0, 1.0)
    else:
        valid = count >= 1.0
    w = new_value_weight(conv, momentum, num_batches_tracked)
    # A Python float goes straight to the statistics' dtype: ops.cast would first make it a
    # float32 tensor on TensorFlow (0.1 -> 0.10000000149), 1e-8 off per float64 update.
    w = ops.convert_to_tensor(w, dtype=dtype) if isinstance(w, float) else ops.cast(w, dtype)
    w = ops.where(valid, w, ops.zeros_like(count))
    keep = 1.0 - w
    new_mean = ops.where(valid, keep * running_mean + w * batch_mean, running_mean)
    new_var = ops.where(valid, keep * running_var + w * batch_var, running_var)
    return new_mean, new_var, valid


def renorm_correction(mean, var, renorm_mean, renorm_stddev, epsilon: float, clipping: dict):
    """Batch renormalization's ``(r, d)`` as Keras 3.15 computes them (no gradient).

        sigma_B = sqrt(var + eps),   sigma_R = max(renorm_stddev, sqrt(eps))
        r = clip(sigma_B / sigma_R, rmin, rmax),   d = clip((mean - renorm_mean) / sigma_R, -dmax, dmax)

    Source: keras/src/layers/normalization/batch_normalization.py,
    ``_renorm_correction_and_moments``; Ioffe (2017), arXiv:1702.03275, Alg. 1.
    """
    stddev = ops.sqrt(var + epsilon)
    renorm_stddev = ops.maximum(renorm_stddev, math.sqrt(epsilon))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)


def renorm_update(
    mean, var, *, moving_mean, moving_stddev, renorm_mean, renorm_stddev, momentum, renorm_momentum, epsilon
):
    """Keras 3.15's renorm moving averages (``_update_renorm_statistics``), as new values.

        sigma = sqrt(var + eps)
        renorm_mean   <- renorm_mean * renorm_momentum + mean * (1 - renorm_momentum)
        renorm_stddev <- renorm_stddev * renorm_momentum + sigma * (1 - renorm_momentum)
        moving_mean   <- moving_mean * momentum + mean * (1 - momentum)
        moving_stddev <- moving_stddev * momentum + sigma * (1 - momentum)
        moving_variance = relu(moving_stddev^2 - eps)

    Returns a dict of new values keyed by weight name.
    """
    stddev = ops.sqrt(var + epsilon)
    new_stddev = moving_stddev * momentum + stddev * (1.0 - momentum)
    return {
        "renorm_mean": renorm_mean * renorm_momentum + mean * (1.0 - renorm_momentum),
        "renorm_stddev": renorm_stddev * renorm_momentum + stddev * (1.0 - renorm_momentum),
        "moving_mean": moving_mean * momentum + mean * (1.0 - momentum),
        "moving_stddev": new_stddev,
        "moving_variance": ops.relu(new_stddev * new_stddev - epsilon),
    }
