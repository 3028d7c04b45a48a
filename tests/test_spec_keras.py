"""Keras/TensorFlow as an independent source: keras.layers.BatchNormalization and TF kernels.

- Keras 3 BatchNormalization ("keras" convention, default eps 1e-3): outputs, moving statistics
  over several training steps, inference with them, and tf.GradientTape gradients against
  ``spec.batch_norm_backward``.
- ``tf.raw_ops.FusedBatchNormV3`` (the kernel behind TF1's fused tf.layers BN) against the
  "tf1" convention: Bessel-corrected variance in the moving average.
``pytest -s`` prints the largest errors seen.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _peer_errors import PeerErrors  # noqa: E402
from cases import case, momentum_id  # noqa: E402
from numerics import tolerance  # noqa: E402

import spec  # noqa: E402

PEERS = PeerErrors()  # its largest errors are printed after the module (conftest.py)
agree = PEERS.agree


LAYOUTS = {  # name: (shape after the batch axis, channel axis)
    "NC-axis-1": ((5,), -1),
    "NLC-axis-1": ((6, 4), -1),
    "NHWC-axis-1": ((4, 4, 3), -1),
    "NCHW-axis1": ((3, 4, 4), 1),
    "NDHWC-axis-1": ((3, 2, 3, 2), -1),
}

# Tolerances, for O(1)-O(10) data and |y| <~ 6:
# float32: Keras computes moments with tf.nn.moments in float32 (two-pass), so the batch mean
#   carries ~1e-7 relative error and y a few float32 ulps: 1e-5 relative + 1e-5 absolute.
#   Moving statistics are float32 variables re-rounded every step: 2e-6 relative + 1e-6 absolute.
# float64: the same computation in double; 1e-12 covers reordered sums.
TOL = {
    dtype: {"y": tolerance("peer-vs-spec", dtype, "y"), "stat": tolerance("peer-vs-spec", dtype, "stats")}
    for dtype in ("float32", "float64")
}


def _batch(rng, n, tail, axis, step, dtype):
    shape = (n, *tail)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    loc = rng.uniform(-3, 3, c).reshape(bshape) + 0.2 * step
    scale = rng.uniform(0.3, 3, c).reshape(bshape)
    return (loc + scale * rng.normal(size=shape)).astype(dtype)


def _keras_case(layout: str, *values, dtype: str, detail: str | None = None):
    return case(layout, *values, dtype, peer="keras-builtin", layout=layout.split("-")[0], dtype=dtype, detail=detail)


STEP_CASES = [
    _keras_case(layout, momentum, dtype=dtype, detail=momentum_id(momentum))
    for layout in LAYOUTS
    for momentum, dtype in [(0.99, "float32"), (0.9, "float32"), (0.9, "float64")]
]
BACKWARD_CASES = [_keras_case(layout, dtype=dtype) for layout in LAYOUTS for dtype in ("float32", "float64")]


@pytest.mark.parametrize(("layout", "momentum", "dtype"), STEP_CASES)
def test_keras_batch_normalization_steps_match_spec(layout, momentum, dtype):
    tail, axis = LAYOUTS[layout]
    c = (None, *tail)[axis]
    rng = np.random.default_rng(len(layout) * 100 + int(momentum * 100) + len(dtype))
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, dtype=dtype)  # epsilon: Keras' 1e-3
    layer.build((None, *tail))
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(dtype), rng.normal(size=c).astype(dtype)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    eps = spec.get_convention("keras").default_eps
    assert layer.epsilon == eps
    moving_mean, moving_var = np.zeros(c), np.ones(c)
    for step in range(6):
        x = _batch(rng, (4, 9, 6)[step % 3], tail, axis, step, dtype)
        y = layer(x, training=True)
        want, mean, var = spec.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
        moving_mean, moving_var = spec.update_running_stats(
            moving_mean, moving_var, mean, var, x.size // c, convention="keras", momentum=momentum
        )
        agree("keras BatchNormalization", y, want, TOL[dtype]["y"], what=f"{layout} step {step}: y")
        agree("keras BatchNormalization", layer.moving_mean, moving_mean, TOL[dtype]["stat"], what="moving_mean")
        agree("keras BatchNormalization", layer.moving_variance, moving_var, TOL[dtype]["stat"], what="moving_var")
    x = _batch(rng, 3, tail, axis, 6, dtype)
    want = spec.batch_norm_infer(x, gamma, beta, moving_mean, moving_var, axis=axis, eps=eps)
    agree("keras BatchNormalization", layer(x, training=False), want, TOL[dtype]["y"], what="inference")


def test_keras_mixed_float16_reduces_in_float32():
    """mixed_float16: float16 activations, float32 variables; statistics must not be float16."""
    rng = np.random.default_rng(16)
    layer = keras.layers.BatchNormalization(dtype="mixed_float16")
    layer.build((None, 8, 8, 3))
    x = (100.0 + 4.0 * rng.normal(size=(8, 8, 8, 3))).astype(np.float16)  # float16 sum of 512 values ~5e4
    y = layer(x, training=True)
    assert y.dtype == "float16"
    want, mean, var = spec.batch_norm_train(x, np.ones(3), np.zeros(3), axis=-1, eps=1e-3)
    # One float16 ulp at |y| in [2, 4) is 2^-9 ~ 2e-3 and both sides round once: 4e-3 absolute.
    agree("keras BatchNormalization", y, want, tolerance("peer-vs-spec", "float16"), what="mixed_float16 y")
    _, moving_var = spec.update_running_stats(np.zeros(3), np.ones(3), mean, var, 512, convention="keras")
    agree("keras BatchNormalization", layer.moving_variance, moving_var, TOL["float32"]["stat"], what="moving var")


@pytest.mark.parametrize(("layout", "dtype"), BACKWARD_CASES)
def test_keras_gradient_tape_matches_spec_backward(layout, dtype):
    tail, axis = LAYOUTS[layout]
    c = (None, *tail)[axis]
    rng = np.random.default_rng(len(layout) + len(dtype))
    layer = keras.layers.BatchNormalization(axis=axis, dtype=dtype)
    layer.build((None, *tail))
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    layer.gamma.assign(gamma)
    x = tf.constant(_batch(rng, 6, tail, axis, 0, dtype))
    dy = rng.normal(size=x.shape).astype(dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * dy)
    gx, ggamma, gbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    dx, dgamma, dbeta = spec.batch_norm_backward(dy, x.numpy(), gamma, axis=axis, eps=1e-3)
    # dx is a difference of O(m) terms cancelling to O(1): in float32 ~m ulps of the largest term,
    # m <= 96 here -> 1e-4 absolute; dgamma/dbeta are sums of m O(1) products -> 1e-5 rel + 1e-4 abs.
    tol = tolerance("autodiff", dtype, "grad")
    agree("tf.GradientTape", gx, dx, tol, what=f"{layout}: dx")
    agree("tf.GradientTape", ggamma, dgamma, tol, what=f"{layout}: dgamma")
    agree("tf.GradientTape", gbeta, dbeta, tol, what=f"{layout}: dbeta")


@pytest.mark.parametrize("decay", [case(decay, detail=f"decay{decay}") for decay in (0.99, 0.9)])
def test_fused_batch_norm_v3_is_the_tf1_convention(decay):
    """FusedBatchNormV3 (is_training) feeds a Bessel-corrected variance into its moving average."""
    rng = np.random.default_rng(int(decay * 100))
    c, eps = 3, 1e-3
    scale, offset = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    moving_mean, moving_var = np.zeros(c, np.float32), np.ones(c, np.float32)
    spec_mean, spec_var = np.zeros(c), np.ones(c)
    for step in range(4):
        x = _batch(rng, (2, 5, 3, 4)[step], (4, 4, c), -1, step, "float32")
        y, moving_mean, moving_var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=moving_mean,
            variance=moving_var,
            epsilon=eps,
            exponential_avg_factor=1.0 - decay,
            data_format="NHWC",
            is_training=True,
        )
        want, mean, var = spec.batch_norm_train(x, scale, offset, axis=-1, eps=eps)
        spec_mean, spec_var = spec.update_running_stats(
            spec_mean, spec_var, mean, var, x.size // c, convention="tf1", momentum=decay
        )
        agree("tf FusedBatchNormV3", y, want, TOL["float32"]["y"], what=f"step {step}: y")
        agree("tf FusedBatchNormV3", moving_mean, spec_mean, TOL["float32"]["stat"], what="moving mean")
        agree("tf FusedBatchNormV3", moving_var, spec_var, TOL["float32"]["stat"], what="moving var (unbiased)")
