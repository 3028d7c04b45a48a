"""Batch Normalization forward (training and inference) and backward, in NumPy.

Notation, per channel c over the m values x_i that share it (all axes but ``axis``):

    mu = (1/m) sum_i x_i                  var = (1/m) sum_i (x_i - mu)^2   (biased)
    sigma = sqrt(var + eps)               x_hat_i = (x_i - mu) / sigma
    y_i = gamma * x_hat_i + beta

Training mode uses the batch's mu and var (Ioffe & Szegedy 2015, Alg. 1); inference mode
uses stored (moving) statistics in their place. All arithmetic is float64; ``y`` and
``dx`` come back in x's dtype, statistics and parameter gradients in float64.

An empty training batch (m = 0, e.g. 0 rows) is legal (SPEC.md §9, PyTorch's behaviour): ``y``
is empty, the batch statistics are NaN (there are none) and feed no moving-statistics update,
and the backward pass gives an empty ``dx`` and zero ``dgamma``/``dbeta`` (sums over no values).
"""

from __future__ import annotations

import numpy as np

from spec._checks import (
    as_float_array,
    channel_axis,
    non_negative_variance,
    per_channel,
    positive_eps,
)
from spec.arrays import AllReduceSum, identity, namespace
from spec.moments import ACCUMULATOR, channel_shape, moments, reduction_axes, safe_count, values_per_channel


def _affine(x: np.ndarray, axis: int, gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    channels = x.shape[axis]
    gamma = per_channel(gamma, "gamma", channels).astype(ACCUMULATOR)
    beta = per_channel(beta, "beta", channels).astype(ACCUMULATOR)
    return gamma, beta


def inference_affine(mean, var, gamma=None, beta=None, *, eps: float, xp=None, return_inv_sigma: bool = False):
    """BN with fixed statistics as one per-channel affine map ``y = x * scale + shift`` (SPEC.md §3)::

        scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

    ``gamma`` / ``beta`` None mean 1 / 0 (no scale, no center). Per-channel arrays in, per-channel
    arrays out, any namespace ``xp``; export folds and fuses BN into neighbouring layers with it.
    ``return_inv_sigma=True`` returns ``(scale, shift, 1 / sqrt(var + eps))``: training keeps the
    factor for its backward instead of computing it a second time.
    """
    ns = namespace(xp)
    inv_sigma = ns.rsqrt(var + eps)
    scale = inv_sigma if gamma is None else gamma * inv_sigma
    shift = -(mean * scale) if beta is None else beta - mean * scale
    return (scale, shift, inv_sigma) if return_inv_sigma else (scale, shift)


def normalize(centered, scale, beta=None, *, xp=None, overwrite_centered: bool = False):
    """``y = (x - mean) * scale + beta`` from ``centered = x - mean`` and :func:`inference_affine`'s scale.

    The same y as ``x * scale + shift``; subtracting the mean first keeps x's offset out of the
    rounding (SPEC.md §8). Training passes the batch's statistics, inference the stored ones.
    ``overwrite_centered=True``: ``centered`` is the caller's temporary, which torch may reuse for y
    (:meth:`spec.arrays.Namespace.multiply_add`); NumPy computes the same two operations either way.
    """
    if beta is None:
        return centered * scale
    return namespace(xp).multiply_add(centered, scale, beta, overwrite="x" if overwrite_centered else None)


def _normalize(x: np.ndarray, axis: int, mean, var, gamma, beta, eps: float) -> np.ndarray:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, broadcast along ``axis``."""
    shape = channel_shape(x.ndim, axis)
    scale, _ = inference_affine(mean, var, gamma, beta, eps=eps)
    y = normalize(x.astype(ACCUMULATOR) - mean.reshape(shape), scale.reshape(shape), beta.reshape(shape))
    return y.astype(x.dtype)


def backward_closed_form(
    dy,
    x_hat,
    scale,
    axes: tuple[int, ...],
    *,
    count,
    weights=None,
    all_reduce_sum: AllReduceSum = identity,
    xp=None,
):
    """Training-mode gradients ``(dx, dgamma, dbeta)`` given ``dy`` and ``x_hat`` (SPEC.md §4, §7)::

        dbeta  = sum_i dy_i,   dgamma = sum_i dy_i * x_hat_i
        dx_i   = scale / m * (m * dy_i - w_i * DBETA - w_i * x_hat_i * DGAMMA)

    where DBETA, DGAMMA are dbeta, dgamma summed over replicas by ``all_reduce_sum``: every x_i
    moves the shared statistics. The returned ``dgamma``, ``dbeta`` are this replica's own sums,
    the gradient of its own loss; the optimizer's cross-replica gradient sum adds them up.

    with ``scale = gamma / sigma`` (keepdims), ``m = count`` (keepdims; the weights' sum where
    masked, all replicas' values where synchronized) and ``w`` the mask (1 without one). Sums run
    over every position, masked ones included, as every framework normalizes those too; a masked
    position gets ``scale * dy`` (the statistics do not depend on it). ``dgamma`` and ``dbeta`` keep
    the reduced axes (size 1). A channel without values divides by 1, not 0.
    """
    ns = namespace(xp)
    dbeta, dgamma = ns.sum(dy, axis=axes, keepdims=True), ns.sum(dy * x_hat, axis=axes, keepdims=True)
    total_dbeta, total_dgamma = all_reduce_sum([dbeta, dgamma])
    m = safe_count(count, ns)
    if weights is None:
        dx = scale / m * (m * dy - total_dbeta - x_hat * total_dgamma)
    else:
        dx = scale / m * (m * dy - weights * total_dbeta - weights * x_hat * total_dgamma)
    return dx, dgamma, dbeta


def backward_coefficients(total_dbeta, total_dgamma, scale, *, count, inv_sigma=1.0, xp=None):
    """Per-channel ``(a, b, c)`` with ``dx_i = a * dy_i + w_i * (b * centered_i + c)`` (SPEC.md §4, step 6)::

        a = scale,   b = -scale * inv_sigma * DGAMMA / m,   c = -scale * DBETA / m

    :func:`backward_closed_form` with its bracket multiplied out, for ``centered = x_hat / inv_sigma``
    (``inv_sigma=1`` when ``centered`` is x_hat itself). ``DBETA``, ``DGAMMA`` are the all-replica
    sums, ``m`` the (safe) count, ``w`` the mask (1 without one). Only per-channel arithmetic.
    """
    # The sign goes on m, a Python number where the count is one (torch_ref): one array op fewer each,
    # and the same bits, since rounding to nearest is symmetric: -(p * q) / m == (p * q) / -m.
    negative_m = -safe_count(count, xp)
    a = scale
    c = (scale * total_dbeta) / negative_m
    b = (scale * inv_sigma) * total_dgamma / negative_m
    return a, b, c


def backward_coefficient_form(
    dy,
    centered,
    inv_sigma,
    scale,
    axes: tuple[int, ...],
    *,
    count,
    weights=None,
    all_reduce_sum: AllReduceSum = identity,
    xp=None,
    overwrite_centered: bool = False,
    centered_offset=None,
    x=None,
    mean=None,
):
    """:func:`backward_closed_form` from ``centered = x - mean`` and ``inv_sigma``, in per-channel coefficients.

    With ``x_hat = centered * inv_sigma`` (never formed) and :func:`backward_coefficients`::

        dbeta  = sum_i dy_i,   dgamma = inv_sigma * sum_i dy_i * centered_i
        dx_i   = a * dy_i + w_i * (b * centered_i + c)

    the same dx as SPEC.md §4's ``scale / m * (m * dy - w * DBETA - w * x_hat * DGAMMA)``, but only
    two x-sized passes after the sums (one fused multiply-add each, :meth:`spec.arrays.Namespace.multiply_add`)
    instead of six out-of-place temporaries. torch_ref calls it, writing dx into buffers it owns; keras_bn
    calls it inside its ``custom_gradient`` on ``x - shift`` with ``centered_offset`` (fewer x-sized ops
    where each op is a pass: TensorFlow graphs, eager torch). The NumPy
    reference (:func:`batch_norm_backward`) stays on :func:`backward_closed_form` too: multiplying the
    bracket out rounds differently, and the golden vectors pin the reference's float64 bits; the two
    agree to float64 rounding (tests/test_spec_namespaces.py). ``overwrite_centered=True`` lets torch
    reuse the caller's temporary ``centered`` for dx; given ``x`` and ``mean`` too (and no ``centered_offset``),
    torch also forms ``dy * centered`` in it and then ``x - mean`` again (the same values, one x-sized allocation
    fewer). Returns ``(dx, dgamma, dbeta)`` like :func:`backward_closed_form` (this replica's own dgamma, dbeta,
    keepdims).

    ``centered_offset`` (per-channel, e.g. :class:`spec.ShiftedMoments`' ``delta``): ``centered`` is ``x - shift``
    and ``x - mean = centered - centered_offset``, folded into the per-channel sums and coefficients instead of
    an x-sized subtraction: ``dgamma = inv_sigma * (sum dy * centered - offset * dbeta)``, ``c -= b * offset``.
    """
    ns = namespace(xp)
    dbeta = ns.sum(dy, axis=axes, keepdims=True)
    recompute = overwrite_centered and x is not None and mean is not None and centered_offset is None
    products = ns.multiply(centered, dy, overwrite=recompute)
    dy_centered = ns.sum(products, axis=axes, keepdims=True)
    if products is centered:
        centered = ns.subtract(x, mean, out=products)
    if centered_offset is not None:
        dy_centered = dy_centered - centered_offset * dbeta
    dgamma = dy_centered * inv_sigma
    total_dbeta, total_dgamma = all_reduce_sum([dbeta, dgamma])
    a, b, c = backward_coefficients(total_dbeta, total_dgamma, scale, count=count, inv_sigma=inv_sigma, xp=ns)
    if centered_offset is not None:
        c = c - b * centered_offset
    correction = ns.multiply_add(centered, b, c, overwrite="x" if overwrite_centered else None)
    if weights is not None:
        correction = correction * weights
    # ``correction`` is a temporary of this function (or the caller's, when it gave it away): reuse it
    return ns.multiply_add(dy, a, correction, overwrite="b"), dgamma, dbeta


def batch_norm_tangent(
    dx, x_hat, inv_sigma, axes: tuple[int, ...], *, count, gamma=None, dgamma=None, dbeta=None, xp=None
):
    """Training-mode forward-mode derivative (jvp): the tangent ``dy`` for tangents of x, gamma and beta::

        dy_i = gamma * inv_sigma * (dx_i - mean(dx) - x_hat_i * mean(x_hat * dx)) + dgamma * x_hat_i + dbeta

    the means over a channel's ``m = count`` values (keepdims, or a Python number). Differentiating
    ``y = gamma * x_hat + beta`` with the batch's own statistics: ``d mu = mean(dx)`` and
    ``d sigma = sigma * mean(x_hat * dx)``, so ``d x_hat = inv_sigma * (dx - d mu) - x_hat * d sigma / sigma``;
    the bracket is SPEC.md §4's backward bracket transposed. ``inv_sigma`` is ``1 / sqrt(var + eps)``,
    ``gamma`` None means 1; a tangent None is zero, and ``dy`` is None when all three are. Keepdims
    per-channel arrays, any namespace ``xp``; torch_ref's ``jvp`` calls it, :func:`batch_norm_jvp` is
    the NumPy reference.
    """
    ns = namespace(xp)
    m = safe_count(count, ns)
    dy = None
    if dx is not None:
        mean_dx = ns.sum(dx, axis=axes, keepdims=True) / m
        mean_x_hat_dx = ns.sum(x_hat * dx, axis=axes, keepdims=True) / m
        dx_hat = inv_sigma * (dx - mean_dx - x_hat * mean_x_hat_dx)
        dy = dx_hat if gamma is None else dx_hat * gamma
    if dgamma is not None:
        dy = x_hat * dgamma if dy is None else dy + x_hat * dgamma
    if dbeta is not None:
        dy = dbeta + 0.0 * x_hat if dy is None else dy + dbeta
    return dy


def _batch_normalized(x: np.ndarray, axis: int, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, inv_sigma, x_hat)`` of a training batch in float64, count and inv_sigma keepdims (broadcast
    against x): ``x_hat = (x - mean) * inv_sigma`` with the batch's own statistics, which need more than one value
    per channel. The derivatives (:func:`batch_norm_jvp`, :func:`batch_norm_backward`) both start from it."""
    count, mean, var = moments(x, axis=axis)
    if np.any(count <= 1):
        raise ValueError(f"training needs more than one value per channel, got {int(np.min(count))}")
    shape = channel_shape(x.ndim, axis)
    inv_sigma, _ = inference_affine(mean, var, eps=eps)
    x_hat = (x.astype(ACCUMULATOR) - mean.reshape(shape)) * inv_sigma.reshape(shape)
    return count.reshape(shape), inv_sigma.reshape(shape), x_hat


def batch_norm_jvp(x, gamma, dx, dgamma=None, dbeta=None, *, axis: int = 1, eps: float = 1e-5) -> np.ndarray:
    """Training-mode forward-mode derivative in float64: the tangent of :func:`batch_norm_train`'s ``y``.

    ``dx`` has x's shape; ``dgamma``, ``dbeta`` (per channel, None for zero) are the tangents of
    gamma and beta. The formula is :func:`batch_norm_tangent`'s; returns ``dy`` in x's dtype.
    """
    x = as_float_array(x, "x")
    dx = as_float_array(dx, "dx")
    if dx.shape != x.shape:
        raise ValueError(f"dx must have the shape of x {x.shape}, got {dx.shape}")
    axis = channel_axis(x, axis)
    eps = positive_eps(eps)
    channels = x.shape[axis]
    gamma = per_channel(gamma, "gamma", channels).astype(ACCUMULATOR)
    count, inv_sigma, x_hat = _batch_normalized(x, axis, eps)
    shape = inv_sigma.shape
    tangents = [
        None if t is None else per_channel(t, name, channels).astype(ACCUMULATOR).reshape(shape)
        for t, name in ((dgamma, "dgamma"), (dbeta, "dbeta"))
    ]
    dy = batch_norm_tangent(
        dx.astype(ACCUMULATOR),
        x_hat,
        inv_sigma,
        reduction_axes(x.ndim, axis),
        count=count,
        gamma=gamma.reshape(shape),
        dgamma=tangents[0],
        dbeta=tangents[1],
    )
    return dy.astype(x.dtype)


def batch_norm_train(
    x, gamma, beta, *, axis: int = 1, eps: float = 1e-5, mask=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode forward: normalize with the batch's own statistics.

    Returns ``(y, mean, var)`` where ``var`` is the **biased** batch variance (the one used
    to normalize; conventions that store an unbiased estimate correct it in
    :func:`spec.update_running_stats`). ``mask`` (broadcastable to x without its channel
    axis) excludes values from the statistics, as Keras does for masked sequences.
    """
    x = as_float_array(x, "x")
    axis = channel_axis(x, axis)
    eps = positive_eps(eps)
    gamma, beta = _affine(x, axis, gamma, beta)
    count, mean, var = moments(x, axis=axis, mask=mask)
    if values_per_channel(x, axis) == 0:  # empty batch: nothing to normalize, no statistic (SPEC.md §9)
        return x.copy(), np.full(x.shape[axis], np.nan), np.full(x.shape[axis], np.nan)
    if np.any(count <= 1):
        raise ValueError(
            f"training needs more than one value per channel to estimate a variance, got "
            f"{int(np.min(count))} (x shape {x.shape}, channel axis {axis})"
        )
    return _normalize(x, axis, mean, var, gamma, beta, eps), mean, var


def batch_norm_infer(x, gamma, beta, mean, var, *, axis: int = 1, eps: float = 1e-5) -> np.ndarray:
    """Inference-mode forward: y = gamma * (x - mean) / sqrt(var + eps) + beta with stored stats."""
    x = as_float_array(x, "x")
    axis = channel_axis(x, axis)
    eps = positive_eps(eps)
    gamma, beta = _affine(x, axis, gamma, beta)
    channels = x.shape[axis]
    mean = per_channel(mean, "mean", channels).astype(ACCUMULATOR)
    var = per_channel(var, "var", channels).astype(ACCUMULATOR)
    non_negative_variance(var, "var")
    return _normalize(x, axis, mean, var, gamma, beta, eps)


def batch_norm_backward(dy, x, gamma, *, axis: int = 1, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode backward: gradients of a loss L given dy = dL/dy.

    Derivation (SPEC.md, "Backward pass"): mu and var depend on every x_i, so

        dbeta  = sum_i dy_i
        dgamma = sum_i dy_i * x_hat_i
        dx_i   = gamma / (m * sigma) * (m * dy_i - dbeta - x_hat_i * dgamma)

    Returns ``(dx, dgamma, dbeta)``; ``dx`` in x's dtype. For an empty batch ``dx`` is empty and
    ``dgamma = dbeta = 0`` (sums over no values; PyTorch gives the same).
    """
    x = as_float_array(x, "x")
    dy = as_float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    axis = channel_axis(x, axis)
    eps = positive_eps(eps)
    gamma = per_channel(gamma, "gamma", x.shape[axis]).astype(ACCUMULATOR)
    if values_per_channel(x, axis) == 0:
        zeros = np.zeros(x.shape[axis], ACCUMULATOR)
        return np.zeros_like(x), zeros, zeros.copy()
    count, inv_sigma, x_hat = _batch_normalized(x, axis, eps)
    scale = gamma.reshape(inv_sigma.shape) * inv_sigma
    axes = reduction_axes(x.ndim, axis)
    dx, dgamma, dbeta = backward_closed_form(dy.astype(ACCUMULATOR), x_hat, scale, axes, count=count)
    dgamma, dbeta = dgamma.reshape(-1), dbeta.reshape(-1)
    return dx.astype(x.dtype), dgamma, dbeta
