"""Keras-side bookkeeping around spec's formulas: gradient wiring, a graph-safe update, renorm.

The math is :mod:`spec`'s, called with ``xp=keras.ops`` on the layer's tensors (the update also with
``xp=torch`` on the torch backend's own tensors):
:func:`spec.shifted_moments` (statistics), :func:`spec.backward_coefficient_form` (gradient),
:func:`spec.inference_affine` / :func:`spec.normalize` (y), :func:`spec.new_value_weight`,
:func:`spec.variance_for_update` and :func:`spec.moving_average` (the update). What stays here
is what only a Keras layer needs: wiring the spec's gradient through ``custom_gradient``,
an update that cannot raise inside a graph, and Keras 3.15's batch renormalization (Ioffe 2017),
which the spec does not cover. ``all_reduce_sum`` (``keras_bn.sync``) makes any of these
synchronized across replicas.
"""

from __future__ import annotations

import math

import keras
from keras import ops

import spec
from spec.conventions import Convention

#: An unknown batch size (None while tracing ``fit``) counts as this many rows wherever a choice depends on the
#: input's size: ``keras_bn.tuning``'s timings and the layer's conditional-refinement threshold.
UNKNOWN_BATCH = 32


def per_channel(value):
    """A keepdims statistic as the (C,) vector the layer's weights hold."""
    return ops.reshape(value, (-1,))


def cast(x, dtype: str):
    """``ops.cast(x, dtype)`` (``dtype`` a name, as ``keras.backend.standardize_dtype`` gives it), or x as it is where
    it has that dtype already, a variable's value: a cast to the same dtype still converts its argument on every
    call (a few microseconds on the torch backend, where LeNet's BN call is mostly such overhead)."""
    if keras.backend.standardize_dtype(x.dtype) != dtype:
        return ops.cast(x, dtype)
    return x.value if isinstance(x, keras.Variable) else x


def stop_gradient(value):
    """``ops.stop_gradient(value)``, skipped where no gradient can flow: a Python number (a count known from the
    shape) or a torch tensor autograd does not track (torch_ref's statistics are non-differentiable outputs)."""
    if isinstance(value, int | float) or getattr(value, "requires_grad", None) is False:
        return value
    return ops.stop_gradient(value)


def moments(
    x, axes: tuple[int, ...], weights=None, all_reduce_sum=spec.identity, *, conditional: bool = False
) -> spec.ShiftedMoments:
    """:func:`spec.shifted_moments` of ``x`` in x's dtype, without gradient (keepdims shapes).

    Gradients through the statistics are :func:`normalize_batch`'s (SPEC.md §4); ``weights`` is
    the mask as 0/1 floats broadcast to ``x``. A channel with count 0 gets mean 0, var 0.

    ``conditional=True`` refines the mean only where needed (SPEC.md §8.5), in a traced conditional: ordinary
    data skip one reduction over x (under XLA:CPU also the write and read of ``x - shift``; bench/xla_cost.py).
    Synchronized statistics keep the refinement unconditional: the branch would hold a collective.
    """
    refine = spec.REFINE_WHEN_NEEDED if conditional and all_reduce_sum is spec.identity else True
    return spec.shifted_moments(
        ops.stop_gradient(x), axes, weights=weights, all_reduce_sum=all_reduce_sum, refine=refine, xp=ops
    )


def normalize_batch(
    x, stats: spec.ShiftedMoments, gamma, beta, epsilon: float, axes, weights=None, all_reduce_sum=spec.identity
):
    """Training-mode ``y = x_hat * scale + beta`` with ``x_hat = ((x - shift) - delta) / sigma``,
    differentiated by :func:`spec.backward_coefficient_form` (the statistics depend on x; SPEC.md §4).

    ``x - shift`` is the difference the statistics summed; ``delta`` (the mean's refinement, per channel) is
    folded into the per-channel offset forward (``beta - delta * scale``) and into the coefficients backward,
    so that neither direction subtracts it over the whole batch: forward ``(x - shift) * scale + offset``, one
    multiply-add; backward the two reductions and ``a * dy + b * (x - shift) + c``. Outside XLA every
    elementwise op is a pass over x (5 x-sized ops fewer per step than the closed form on x_hat), and under
    XLA it fuses the same. With ``all_reduce_sum`` one cross-replica sum of (dbeta, dgamma).
    """
    gamma = ops.ones_like(stats.var) if gamma is None else gamma
    beta = ops.zeros_like(stats.var) if beta is None else beta
    shape = ops.shape(stats.var)
    inv_sigma, _ = spec.inference_affine(stats.mean, stats.var, eps=epsilon, xp=ops)
    shift, delta = stats.shift, stats.delta

    @ops.custom_gradient
    def forward(x, gamma, beta):
        scale = inv_sigma * ops.reshape(gamma, shape)
        y = spec.normalize(x - shift, scale, ops.reshape(beta, shape) - delta * scale)

        def backward(*args, upstream=None):
            dy = args[0] if upstream is None else upstream  # TF passes dy; torch passes (*inputs, upstream=dy)
            # x - shift again rather than kept from the forward: XLA fuses it, TF's graph optimizer merges the two
            dx, dgamma, dbeta = spec.backward_coefficient_form(
                dy,
                x - shift,
                inv_sigma,
                scale,
                axes,
                count=stats.count,
                weights=weights,
                all_reduce_sum=all_reduce_sum,
                centered_offset=delta,
                xp=ops,
            )
            return dx, per_channel(dgamma), per_channel(dbeta)

        return y, backward

    return forward(x, gamma, beta)


def update_running_stats(
    running_mean,
    running_var,
    batch_mean,
    batch_var,
    count,
    *,
    conv: Convention,
    momentum,
    num_batches_tracked=None,
    xp=ops,
):
    """One moving-statistics update, :func:`spec.update_running_stats` without raising (graph-safe).

        new = (1 - w) * old + w * variance_for_update(batch)     (spec's weight and Bessel factor)

    Returns ``(new_mean, new_var, valid)`` in the statistics' dtype. Where the spec raises (count < 1, or
    count <= 1 for an unbiased variance) a layer inside a graph cannot, so ``valid`` is False there and
    the statistics are returned unchanged: an empty or all-masked batch carries no information
    (and its statistics may be NaN, which a zero weight would not keep out: 0 * NaN = NaN).

    ``xp`` is the tensors' namespace: ``keras.ops`` on any backend, or ``torch`` for the torch backend's own
    tensors (there keras.ops' conversion of every argument costs more than these C-sized operations;
    bench/profile_keras_torch.py). ``count`` is per channel, or one Python number known from a static shape
    (the torch backend's path): then ``valid`` is a Python bool and the update needs no ``where``.
    """
    ns = spec.namespace(xp)
    dtype = running_mean.dtype
    if not isinstance(count, int | float):
        count = ns.cast(count, dtype)
    valid = count > 1.0 if conv.running_variance == "unbiased" else count >= 1.0
    batch_var = spec.variance_for_update(conv, ns.cast(batch_var, dtype), count, xp=xp)
    # float64 counter: Caffe's 1 - f^n for f = 0.999 cancels three digits.
    n = None if num_batches_tracked is None else ns.cast(num_batches_tracked, "float64")
    w = spec.new_value_weight(conv, momentum, n, xp=xp)
    w = ns.asarray(w, dtype) if isinstance(w, float) else ns.cast(w, dtype)
    new_mean = ns.where(valid, spec.moving_average(running_mean, ns.cast(batch_mean, dtype), w), running_mean)
    new_var = ns.where(valid, spec.moving_average(running_var, batch_var, w), running_var)
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
