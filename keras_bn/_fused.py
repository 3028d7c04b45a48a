"""TensorFlow's fused BN kernel (``FusedBatchNormV3``) as the layer's fast path.

One kernel computes the batch moments and normalizes (training) or normalizes with given
statistics (inference), and has a fused gradient; Keras 3's built-in layer composes ~10
elementwise ops instead. Two conventions of the kernel matter:

- its ``batch_variance`` output is Bessel-corrected, ``var * m / max(m - 1, 1)`` (it
  normalizes with the biased one); :func:`train` converts it back to the biased variance so
  the layer feeds every convention's update the same quantity as :mod:`spec` does;
- under XLA (``jit_compile=True``) the op lowers to ``BatchNormTraining``, whose CPU
  expansion computes ``E[x^2] - E[x]^2`` in float32: for x = 1e4 + 1e-2 * N(0, 1) it
  returns *negative* variances. The layer therefore never uses this path inside XLA
  (:func:`in_xla_context`); there the generic ``keras.ops`` path compiles to the same
  fused loops anyway.

Any rank with the channel axis last or (rank >= 3) at position 1 is viewed as 4-D NHWC or
NCHW by a free reshape: BN reduces over every other axis, so their grouping is irrelevant.
"""

from __future__ import annotations

import functools

import tensorflow as tf

import spec

try:  # private but stable since TF 1.x; Keras 2 used it for the same purpose
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover - if TF moves it, stay correct (generic path) rather than fast
    GraphOrParentsInXlaContext = None

DTYPES = ("float16", "bfloat16", "float32")
_SHIFT_ROWS = 8  # rows averaged for the shift: ~1/8 of a 64-batch read once more


def in_xla_context() -> bool:
    """True while tracing a ``jit_compile=True`` function (``tf.function`` or Keras ``fit``)."""
    if GraphOrParentsInXlaContext is None:
        return True
    return bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def pays_off(shape, channel_axis: int) -> bool:
    """Whether the fused *training* kernel beats the generic path for this input (``fused=None``).

    On x86 the kernel is oneDNN's, which has a JIT kernel only for channel counts divisible by 4
    (SSE4.1), 8 (AVX2) or 16 (AVX-512) and a reference loop (``nspc_bnorm:any``) otherwise, on any
    x86 CPU (``ONEDNN_VERBOSE=1``); 2-D inputs (no spatial extent) lose to the generic path too.
    Checked against the generic path per shape with ``bench/bench_fused_rule.py`` on a 2-core Xeon,
    natively and capped at AVX2 (README, "Which path fused=None trains on"): right for 6 or 7
    channels, LeNet's dense layers and, natively, 4-64 channels at 64x14x14 (0.4-0.8x the generic
    time; 24 channels 0.9-1.0x). Wrong for small activations (LeNet's second BN, 64x8x8x16: up to 1.1x natively and
    1.3-1.5x capped, a tie in 2 of 6 runs; 0.1-0.5 ms a call) and, capped, for 24+ channels (a tie
    to 1.6x), where the only real AVX2 figure (issue #14's EPYC, 64x56x56x64) still has the kernel
    faster. The rule is kept: a changed path trains differently, and ``KERAS_BN_FUSED=measure``
    picks per machine. GPUs (cuDNN) have no such cliffs, so with a GPU visible it is always used.
    """
    if gpu_visible():
        return True
    channels = shape[channel_axis]
    spatial = [d for a, d in enumerate(shape) if a not in (0, channel_axis % len(shape))]
    return channels is not None and channels % 4 == 0 and any(d is None or d > 1 for d in spatial)


@functools.cache
def gpu_visible() -> bool:
    """Asked once: the device list is fixed after TensorFlow initializes, and calls may be eager."""
    return bool(tf.config.list_logical_devices("GPU"))


def data_format(ndim: int, axis: int) -> str | None:
    """``"NHWC"`` for a last channel axis, ``"NCHW"`` for axis 1 (rank >= 3), else None."""
    if axis == ndim - 1:
        return "NHWC"
    if axis == 1 and ndim >= 3:
        return "NCHW"
    return None


def _as_4d(x, fmt: str):
    if x.shape.rank == 4:
        return x
    channels = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    if fmt == "NHWC":
        return tf.reshape(x, [-1, 1, 1, channels])
    return tf.reshape(x, tf.stack([tf.shape(x)[0], channels, -1, 1]))


def _affine(gamma, beta, channels: int):
    gamma = tf.ones([channels], tf.float32) if gamma is None else tf.cast(gamma, tf.float32)
    beta = tf.zeros([channels], tf.float32) if beta is None else tf.cast(beta, tf.float32)
    return gamma, beta


def _shift(x4, fmt: str):
    """A per-channel estimate of the batch mean from its first few rows, or None.

    The kernel's float32 statistics lose the variance when |mean| >> std (x = 1e4 + 1e-2 *
    N(0, 1): ~1% off, see ``bench_layer.py --accuracy``). BN in training mode is invariant to
    a per-channel constant shift, so normalizing ``x - shift`` gives the same y and gradients
    while the kernel only sees deviations on the scale of the data's spread. The shift is the
    mean of the first ``_SHIFT_ROWS`` samples (not one sample: an outlier would *raise*
    |mean| / std for data that is already centered). float16/bfloat16 are left alone: the
    kernel accumulates them in float32 already and a half-precision subtraction would round.
    """
    if x4.dtype != tf.float32:
        return None
    head = x4[:_SHIFT_ROWS]
    axes = [0, 1, 2] if fmt == "NHWC" else [0, 2, 3]
    channels = x4.shape[3] if fmt == "NHWC" else x4.shape[1]
    n = tf.cast(tf.size(head), tf.float32) / channels
    # max(n, 1): an empty batch gets shift 0 rather than NaN.
    return tf.stop_gradient(tf.reduce_sum(head, axis=axes, keepdims=True) / tf.maximum(n, 1.0))


def train(x, gamma, beta, epsilon: float, fmt: str):
    """Training forward: ``(y, count, mean, var)`` with the *biased* batch variance (float32).

    ``count`` is the number of values per channel, ``m``; the kernel's Bessel-corrected
    output is multiplied by ``(m - 1) / m`` (for m = 1 the kernel returns 0, and so do we).
    """
    x4 = _as_4d(x, fmt)
    channels = x4.shape[3] if fmt == "NHWC" else x4.shape[1]
    gamma, beta = _affine(gamma, beta, channels)
    shift = _shift(x4, fmt)
    y, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4 - shift if shift is not None else x4,
        scale=gamma,
        offset=beta,
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=fmt,
        is_training=True,
    )
    if shift is not None:
        mean = mean + tf.reshape(shift, [channels])
    m = tf.cast(tf.size(x, out_type=tf.int64), tf.float32) / channels
    var = spec.biased_variance(unbiased, m)
    count = tf.fill([channels], m)
    return tf.reshape(y, tf.shape(x)), count, tf.stop_gradient(mean), tf.stop_gradient(var)


def infer(x, gamma, beta, mean, var, epsilon: float, fmt: str):
    """Forward with given statistics: ``y = (x - mean) * gamma / sqrt(var + eps) + beta``."""
    x4 = _as_4d(x, fmt)
    channels = x4.shape[3] if fmt == "NHWC" else x4.shape[1]
    gamma, beta = _affine(gamma, beta, channels)
    y, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=gamma,
        offset=beta,
        mean=tf.cast(mean, tf.float32),
        variance=tf.cast(var, tf.float32),
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=fmt,
        is_training=False,
    )
    return tf.reshape(y, tf.shape(x))
