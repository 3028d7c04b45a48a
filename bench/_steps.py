"""Workloads shared by the benchmarks, written once so that two benchmarks time the same thing."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["tf_batch_norm_step"]


def tf_batch_norm_step(layer, x, dy, *, jit: bool) -> Callable[[], tuple]:
    """One BN training step on TensorFlow: forward with ``training=True`` (moving statistics updated) and the
    backward from the fixed cotangent ``dy`` to x, gamma and beta, in ``tf.function(jit_compile=jit)``.

    The returned callable gives ``(y, dx, dgamma, dbeta)`` after synchronizing on ``dgamma`` (a small output),
    so a timer sees the whole step. ``y`` is an output too, so no compiler drops the forward's last pass.
    """
    import tensorflow as tf

    layer.build(x.shape)

    @tf.function(jit_compile=jit)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)

    def run() -> tuple:
        out = step(x, dy)
        out[2].numpy()
        return out

    return run
