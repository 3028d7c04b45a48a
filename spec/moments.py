"""Per-channel moments: two-pass in float64, and Chan's parallel merge.

Why not ``E[x^2] - E[x]^2``: for x = 1e4 + 1e-2 * N(0, 1) in float32, E[x^2] ~ 1e8 carries
an absolute rounding error of ~8 (float32 ulp at 1e8), so the difference of two such
numbers cannot resolve a variance of 1e-4. Keras' synchronized BN and its numpy/torch
backends compute exactly that. Here the mean is subtracted *before* squaring (two-pass),
in float64, and replica statistics are merged by Chan et al. (1979) from (count, mean, M2).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from spec._checks import as_float_array, channel_axis, mask_weights, non_negative_counts

ACCUMULATOR = np.float64


def reduction_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis except the channel axis: BN statistics are per channel."""
    return tuple(a for a in range(ndim) if a != axis)


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against x (1 everywhere but ``axis``)."""
    return tuple(-1 if a == axis else 1 for a in range(ndim))


def values_per_channel(x: np.ndarray, axis: int) -> int:
    """``m`` before any mask: the product of every axis but the channel axis (0 for an empty batch)."""
    return int(np.prod([x.shape[a] for a in reduction_axes(x.ndim, axis)], dtype=object))


def _broadcast_mask(mask, x: np.ndarray, axis: int) -> np.ndarray:
    mask = mask_weights(mask)
    if mask.ndim == x.ndim - 1:  # Keras passes masks without the channel axis
        mask = np.expand_dims(mask, axis)
    try:
        return np.broadcast_to(mask.astype(ACCUMULATOR), x.shape)
    except ValueError:
        raise ValueError(f"mask of shape {np.shape(mask)} does not broadcast to x of shape {x.shape}") from None


def moments(x, *, axis: int = 1, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel ``(count, mean, var)`` of ``x``; ``var`` is the *biased* variance.

        count = sum_i w_i,   mean = sum_i w_i x_i / count,
        var   = sum_i w_i (x_i - mean)^2 / count           (two passes, float64)

    ``w`` is ``mask`` (1 = use the value) or all ones. ``count`` is per channel (float64),
    so masked and unmasked statistics have the same shape and merge the same way.
    """
    x = as_float_array(x, "x")
    axis = channel_axis(x, axis)
    axes = reduction_axes(x.ndim, axis)
    xd = x.astype(ACCUMULATOR)
    if mask is None:
        count = np.full(x.shape[axis], float(np.prod([x.shape[a] for a in axes])), ACCUMULATOR)
        # An empty replica (batch 0) is legal input to merge_moments: count 0, NaN moments, no warning.
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = xd.sum(axis=axes) / count
            centered = xd - mean.reshape(channel_shape(x.ndim, axis))
            var = (centered * centered).sum(axis=axes) / count
        return count, mean, var
    w = _broadcast_mask(mask, x, axis)
    count = w.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A masked-out NaN must not poison the channel: select, don't multiply.
        mean = np.where(w > 0, xd, 0.0).sum(axis=axes) / count
        centered = np.where(w > 0, xd - mean.reshape(channel_shape(x.ndim, axis)), 0.0)
        var = (w * centered * centered).sum(axis=axes) / count
    return count, mean, var


def merge_moments(parts: Iterable[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-replica ``(count, mean, var)`` into global ``(count, mean, var)``.

    Chan, Golub & LeVeque's pairwise update on M2 = var * count (biased var):

        n = n_a + n_b,   d = mean_b - mean_a,
        mean = mean_a + d * n_b / n,
        M2 = M2_a + M2_b + d^2 * n_a * n_b / n

    Exact for unequal counts (a replica with count 0 contributes nothing) and free of the
    cancellation in ``E[x^2] - E[x]^2``: only differences of means are squared.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_moments needs at least one (count, mean, var) part")
    total_n = total_mean = total_m2 = None
    channels = None  # the shape of part 0's mean: every part must describe the same channels
    for index, part in enumerate(parts):
        if len(part) != 3:
            raise ValueError(f"part {index} must be (count, mean, var), got {len(part)} items")
        n = non_negative_counts(part[0], f"part {index} count")
        mean, var = (np.asarray(v, ACCUMULATOR) for v in part[1:])
        if var.shape != mean.shape or n.shape not in ((), mean.shape):
            raise ValueError(
                f"part {index} has count, mean, var of shapes {n.shape}, {mean.shape}, {var.shape}; "
                "mean and var must match and count must be a scalar or match them"
            )
        if channels is None:
            channels = mean.shape
        elif mean.shape != channels:
            raise ValueError(
                f"part {index} has mean of shape {mean.shape} but part 0 has {channels}: "
                "every part must describe the same channels"
            )
        if np.any(var < 0):
            raise ValueError(f"part {index} has a negative variance")
        m2 = var * n
        if total_n is None:
            total_n, total_mean, total_m2 = n, np.where(n > 0, mean, 0.0), np.where(n > 0, m2, 0.0)
            continue
        n_ab = total_n + n
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(n_ab > 0, n / n_ab, 0.0)
        delta = np.where(n > 0, mean - total_mean, 0.0)
        total_mean = total_mean + delta * share
        total_m2 = total_m2 + np.where(n > 0, m2, 0.0) + delta * delta * total_n * share
        total_n = n_ab
    per_channel_n = np.broadcast_to(total_n, total_mean.shape)
    if np.any(per_channel_n <= 0):
        where = ""
        if per_channel_n.ndim:
            empty = np.argwhere(per_channel_n <= 0)
            empty = [int(c[0]) if per_channel_n.ndim == 1 else tuple(int(i) for i in c) for c in empty]
            where = f"channel {empty[0]}" if len(empty) == 1 else f"channels {empty}"
            where = f" in {where}"
        raise ValueError(f"merge_moments: every part has count 0{where}; there are no values to merge")
    return total_n, total_mean, total_m2 / total_n
