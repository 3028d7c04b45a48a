"""Per-channel moments: two-pass in float64, and Chan's parallel merge.

Why not ``E[x^2] - E[x]^2``: for x = 1e4 + 1e-2 * N(0, 1) in float32, E[x^2] ~ 1e8 carries
an absolute rounding error of ~8 (float32 ulp at 1e8), so the difference of two such
numbers cannot resolve a variance of 1e-4. Keras' synchronized BN and its numpy/torch
backends compute exactly that. Here the mean is subtracted *before* squaring (two-pass),
in float64, and replica statistics are merged by Chan et al. (1979) from (count, mean, M2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from spec._checks import as_float_array, channel_axis, mask_weights, non_negative_counts
from spec.arrays import AllReduceSum, identity, namespace

ACCUMULATOR = np.float64
#: ``shifted_moments(refine=...)``: refine only where the first pass's rounding can matter (SPEC.md §8.5)
REFINE_WHEN_NEEDED = "when_needed"


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


class ShiftedMoments(NamedTuple):
    """Per-channel statistics with keepdims shapes (broadcastable against x), from :func:`shifted_moments`."""

    # values per channel (the weights' sum where masked), summed over replicas (a Python number
    # where shifted_moments(count_as_number=True) needs no sum for it)
    count: Any
    mean: Any  # shift + delta
    var: Any  # biased
    shift: Any  # the first-pass mean, a per-channel constant
    delta: Any  # mean(x - shift): ``(x - shift) - delta`` is ``x - mean`` without rounding through ``mean``


def safe_count(count, xp=None):
    """``count`` with 0 replaced by 1: a channel without values divides 0 by 1, not by 0."""
    if isinstance(count, int | float):  # a Python number: no array op per step for it
        return count if count > 0 else 1.0
    ns = namespace(xp)
    return ns.where(count > 0, count, 1.0)


def shifted_moments(
    x,
    axes: tuple[int, ...],
    *,
    weights=None,
    all_reduce_sum: AllReduceSum = identity,
    refine: bool | str = True,
    return_centered: bool = False,
    count_as_number: bool = False,
    xp=None,
) -> ShiftedMoments | tuple[ShiftedMoments, Any]:
    """Per-channel ``(count, mean, var)`` of ``x`` over ``axes`` by the shifted two-pass algorithm (SPEC.md §2, §7).

    Chan, Golub & LeVeque (1983, eq. 1.7), around a shift shared by every replica::

        round 1:  n = sum_r sum_i w_i,   shift = sum_r sum_i w_i x_i / n
        round 2:  D1 = sum_r sum_i w_i (x_i - shift),   D2 = sum_r sum_i w_i (x_i - shift)^2
        delta = D1 / n,   mean = shift + delta,   var = max(D2 / n - delta^2, 0)

    ``delta`` corrects the rounding of ``shift`` (in float32, for x = 1e4 + 1e-2 * N(0, 1) that
    rounding is ~1e-3, a 1% error in a variance of 1e-4), and ``E[x^2] - E[x]^2`` is never formed.
    ``weights`` (None, or an array broadcast to x in x's dtype: the mask, 1 = use the value) are
    selected, not only multiplied, so a masked-out NaN cannot poison its channel. ``all_reduce_sum``
    sums a list of per-channel arrays over replicas (flax's ``axis_name``; the identity for one
    replica); the result is the statistics of all replicas' values, exact for unequal batch sizes.
    A channel without values gets mean = var = 0 (its ``count`` says so). Arithmetic in x's dtype.

    ``refine=False`` drops ``delta`` (mean = shift, var = D2 / n, delta = 0): the plain two-pass
    form, which the float64 reference and its golden vectors use (SPEC.md §10); in float64 the
    two differ by rounding only, in float32 the refinement is what keeps §8's accuracy.
    ``refine="when_needed"`` (:data:`REFINE_WHEN_NEEDED`) sums ``D1`` only where
    :func:`refinement_matters` says the shift's rounding can reach the variance (SPEC.md §8.5), as a
    traced conditional under keras.ops: ordinary data then skip one reduction over x, large offsets keep
    the refinement. Its condition uses only all-replica sums, so every replica
    takes the same branch.

    ``return_centered=True`` returns ``(stats, x - shift)``: the x-sized difference the second round
    computed (masked positions zeroed where ``weights`` are given), which the caller may reuse (e.g.
    ``(x - shift) * scale + offset``) instead of computing it again. ``count_as_number=True`` returns
    ``count`` as a Python number where it needs no sum (no weights, a single replica, a static shape:
    numpy and torch), which spares the per-channel array ops on it every step; else keepdims.
    """
    if refine not in (True, False, REFINE_WHEN_NEEDED):
        raise ValueError(f"refine must be True, False or {REFINE_WHEN_NEEDED!r}, got {refine!r}")
    ns = namespace(xp)
    if weights is None:
        local_sum = ns.sum(x, axis=axes, keepdims=True)
        n = ns.values_per_channel(x, axes)
        if count_as_number and all_reduce_sum is identity and isinstance(n, float):
            count, (total,) = n, all_reduce_sum([local_sum])
        else:
            count, total = all_reduce_sum([ns.full_like(local_sum, n), local_sum])
    else:
        use = weights > 0
        local_count = ns.sum(weights, axis=axes, keepdims=True)
        local_sum = ns.sum(ns.where(use, weights * x, 0.0), axis=axes, keepdims=True)
        count, total = all_reduce_sum([local_count, local_sum])
    divisor = safe_count(count, ns)
    shift = total / divisor
    shifted = ns.subtract(x, shift)
    if weights is not None:
        shifted = ns.where(use, shifted, 0.0)

    def local_d1(in_branch: bool = False):
        if not in_branch:
            return ns.sum(shifted if weights is None else weights * shifted, axis=axes, keepdims=True)
        # x - shift again, inside the branch: a compiler materializes a captured x-sized operand whether or
        # not the branch runs
        centered = x - shift if weights is None else ns.where(use, x - shift, 0.0) * weights
        return ns.sum_in_branch(centered, axes)

    # D1 first: on torch the square below may overwrite ``shifted``
    eager_d1 = local_d1() if refine is True else None
    if weights is not None:
        local_d2 = ns.sum(weights * shifted * shifted, axis=axes, keepdims=True)
    else:
        # torch squares shifted (this function's temporary) in place and, if the caller wants it, forms
        # x - shift again in the same buffer: the same values, one x-sized allocation fewer.
        squares = ns.multiply(shifted, shifted, overwrite=True)
        local_d2 = ns.sum(squares, axis=axes, keepdims=True)
        if squares is shifted and return_centered:
            shifted = ns.subtract(x, shift, out=squares)
    if refine is False:
        (d2,) = all_reduce_sum([local_d2])
        stats = ShiftedMoments(count, shift, d2 / divisor, shift, 0.0)
        return (stats, shifted) if return_centered else stats
    if refine is True:
        d1, d2 = all_reduce_sum([eager_d1, local_d2])
        delta = d1 / divisor
    else:
        (d2,) = all_reduce_sum([local_d2])

        def refined_delta():
            (d1,) = all_reduce_sum([local_d1(in_branch=True)])
            return d1 / divisor

        needed = refinement_matters(count, shift, d2 / divisor, ns.unit_roundoff(x), xp=ns)
        delta = ns.cond(needed, refined_delta, lambda: ns.full_like(shift, 0.0))
    # D2 / n >= delta^2 exactly (Cauchy-Schwarz); the clamp only absorbs rounding.
    var = ns.maximum(d2 / divisor - delta * delta, 0.0)
    stats = ShiftedMoments(count, shift + delta, var, shift, delta)
    return (stats, shifted) if return_centered else stats


def refinement_matters(count, shift, plain_var, unit_roundoff: float, *, xp=None):
    """Whether skipping the refinement ``delta`` can cost more accuracy than the second pass's own rounding
    (SPEC.md §8.5), decided from the plain two-pass statistics of any channel::

        gamma = (n + 1) * u,   refine  iff  gamma * (sqrt(plain_var) + |shift|)^2 > plain_var  (any channel)

    ``n = count``, ``u`` the unit roundoff of x's dtype, ``plain_var = D2 / n``. ``gamma * (sigma + |mean|)``
    bounds the first pass's error ``|shift - mean|`` for sums in any order (Higham, Accuracy and Stability,
    §4.2); skipping adds its square to the variance, and where the test is false that square is at most
    ``gamma * plain_var``, the bound on D2's own rounding. In float32 with 200,704 values per channel it
    refines where ``|mean| / std`` exceeds ~8; an empty channel (n = 0, all zero) never asks for it.
    """
    ns = namespace(xp)
    gamma = (count + 1.0) * unit_roundoff
    spread = ns.sqrt(plain_var) + ns.abs(shift)
    return ns.any(gamma * (spread * spread) > plain_var)


def moments(x, *, axis: int = 1, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel ``(count, mean, var)`` of ``x``; ``var`` is the *biased* variance.

        count = sum_i w_i,   mean = sum_i w_i x_i / count,
        var   = sum_i w_i (x_i - mean)^2 / count     (:func:`shifted_moments`, plain two-pass, float64)

    ``w`` is ``mask`` (1 = use the value) or all ones. ``count`` is per channel (float64),
    so masked and unmasked statistics have the same shape and merge the same way. A channel
    with count 0 (an empty batch, SPEC.md §9) has NaN mean and var: there are no values.
    """
    x = as_float_array(x, "x")
    axis = channel_axis(x, axis)
    axes = reduction_axes(x.ndim, axis)
    weights = None if mask is None else _broadcast_mask(mask, x, axis)
    stats = shifted_moments(x.astype(ACCUMULATOR), axes, weights=weights, refine=False)
    count, mean, var = (np.reshape(np.broadcast_to(a, stats.shift.shape), -1) for a in stats[:3])
    empty = count == 0
    return count.copy(), np.where(empty, np.nan, mean), np.where(empty, np.nan, var)


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
