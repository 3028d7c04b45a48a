"""The cross-replica sum for synchronized Batch Normalization on ``tf.distribute``.

Synchronization is a parameter of spec's formulas, not a second implementation:
:func:`all_reduce_sum` is what ``BatchNorm(synchronized=True)`` passes as ``all_reduce_sum`` to
:func:`spec.shifted_moments` and :func:`spec.backward_coefficient_form`. Inside a strategy's replica
context (``strategy.run``, ``model.fit`` under a strategy) it sums over replicas, so every replica
gets the moments of the *global* batch; anywhere else it is the identity (the local batch).

spec.shifted_moments (SPEC.md §7) needs two rounds, exact for unequal per-replica batch sizes and
free of ``E[x^2] - E[x]^2`` (Keras' ``BatchNormalization(synchronized=True)`` all-reduces sum(x)
and sum(x^2) instead, and loses the variance at large offsets):

    round 1:  n = sum_r n_r,  S = sum_r sum_i w_i x_i,        shift m = S / n
    round 2:  D1 = sum_r sum_i w_i (x_i - m),  D2 = sum_r sum_i w_i (x_i - m)^2

Collective calls per BatchNorm layer per training step: 2 forward (rounds 1 and 2, each one
batched all-reduce of two per-channel vectors) + 1 backward (the backward's dbeta, dgamma) = 3
(:data:`COLLECTIVES_PER_STEP`); on CPU each batched call is one collective kernel. Keras' own
synchronized path issues 3 forward + 2 backward (measured in tests/test_sync_keras.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from keras import ops

import spec

#: All-reduce calls one BatchNorm layer issues per training step in a multi-replica context.
COLLECTIVES_PER_STEP = {"forward": 2, "backward": 1}


def _normalize_axes(reduction_axes, rank: int) -> list[int]:
    if isinstance(reduction_axes, int) and not isinstance(reduction_axes, bool):
        reduction_axes = [reduction_axes]
    if not isinstance(reduction_axes, Sequence) or isinstance(reduction_axes, str):
        raise TypeError(f"reduction_axes must be an int or a sequence of ints, got {reduction_axes!r}")
    axes = []
    for a in reduction_axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"reduction_axes must hold ints, got {a!r} in {reduction_axes!r}")
        if not -rank <= a < rank:
            raise ValueError(f"reduction axis {a} is out of range for x of rank {rank}")
        axes.append(a % rank)
    if not axes:
        raise ValueError("reduction_axes must name at least one axis")
    if len(set(axes)) != len(axes):
        raise ValueError(f"reduction_axes has repeated axes: {reduction_axes!r}")
    return sorted(axes)


def _mask_weights(mask, x: tf.Tensor, axes: list[int]) -> tf.Tensor:
    """Mask as weights in x's dtype, broadcast to ``x`` (Keras masks lack the channel axis)."""
    mask = tf.cast(tf.convert_to_tensor(mask), x.dtype)
    rank = x.shape.rank
    kept = [a for a in range(rank) if a not in axes]
    if mask.shape.rank == rank - 1 and len(kept) == 1:
        mask = tf.expand_dims(mask, kept[0])
    if mask.shape.rank != rank:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to x of shape {x.shape}")
    try:
        return tf.broadcast_to(mask, tf.shape(x))
    except (ValueError, tf.errors.InvalidArgumentError):
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to x of shape {x.shape}") from None


def _in_multi_replica_context() -> tf.distribute.ReplicaContext | None:
    """The replica context when this code runs on one of several replicas, else None.

    ``get_replica_context()`` is None in a cross-replica context (e.g. directly under
    ``strategy.scope()``) and the default context, with one replica, outside any strategy.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def all_reduce_sum() -> spec.arrays.AllReduceSum:
    """Sum a list of per-channel tensors over the replicas of the current replica context (one batched call).

    ``ReplicaContext.all_reduce`` registers "the gradient of an all-sum is an all-sum", so autodiff
    through it is exact too. Outside a multi-replica context: :func:`spec.identity`.
    """
    ctx = _in_multi_replica_context()
    if ctx is None:
        return spec.identity
    return lambda values: ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def cross_replica_moments(
    x, reduction_axes, mask=None, *, return_centered: bool = False
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor] | tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-channel ``(count, mean, var)`` of ``x`` over all replicas; ``var`` biased.

    :func:`spec.shifted_moments` with :func:`all_reduce_sum`, as a function for code outside the
    layer. ``reduction_axes`` are the axes to reduce (every axis but the channel axis); the results
    have the shape of the remaining axes. ``mask`` (optional, 1 = use the value) has the shape
    of ``x`` or of ``x`` without its single channel axis. In a multi-replica context the
    statistics are those of the concatenation of all replicas' ``x``; elsewhere they are the local
    batch's. ``count`` is the number (or total mask weight) of values per channel; an empty global
    batch gives mean = var = 0 rather than NaN. Differentiable with respect to ``x`` (autodiff
    through both rounds; the layer uses the closed form instead). Results are float32
    (float16/bfloat16/float32 inputs) or float64 (float64 inputs).

    ``return_centered=True`` appends ``x - mean`` (the shape of ``x``) computed as
    ``(x - m) - D1 / n``: for large offsets this is far more accurate than subtracting the
    float32-rounded ``mean`` (at 1e4 that rounding is up to 5e-4, 5% of a 1e-2 spread).
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype.name}")
    if x.shape.rank is None:
        raise ValueError("x must have a known rank")
    axes = _normalize_axes(reduction_axes, x.shape.rank)
    # Statistics in float32 even for float16/bfloat16 activations (mixed precision).
    x = tf.cast(x, tf.float64 if x.dtype == tf.float64 else tf.float32)
    weights = None if mask is None else _mask_weights(mask, x, axes)
    stats = spec.shifted_moments(x, tuple(axes), weights=weights, all_reduce_sum=all_reduce_sum(), xp=ops)
    count, mean, var = (tf.squeeze(t, axes) for t in stats[:3])
    if return_centered:
        return count, mean, var, (x - stats.shift) - stats.delta
    return count, mean, var
