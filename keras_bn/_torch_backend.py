"""keras_bn's training step on Keras' torch backend: torch_ref's autograd Function on the layer's own tensors.

On the torch backend a Keras tensor is a ``torch.Tensor``, so the generic training path (no mask, no renorm,
no cross-replica sum) calls ``torch_ref.batch_norm_train`` directly: the same spec formulas (shifted moments,
affine map, coefficient-form backward) without ``keras.ops``' per-call conversion, read in place at the
layer's channel axis (channels_last by default). The layer still decides when the moving statistics change;
their update is ``_ops.update_running_stats``' operations on the torch tensors.
"""

from __future__ import annotations

import torch

import spec
from spec.conventions import Convention
from torch_ref.batch_norm import batch_norm_train


def train(x: torch.Tensor, gamma, beta, epsilon: float, channel_axis: int):
    """``(y, (count, mean, var))`` as the layer's generic path returns them: per-channel (C,) statistics."""
    y, mean, var = batch_norm_train(x, gamma, beta, epsilon, channel_dim=channel_axis)
    channels = x.shape[channel_axis]
    count = torch.full((channels,), float(x.numel() // channels) if channels else 0.0, dtype=mean.dtype)
    return y, (count, mean, var)


def update_running_stats(
    running_mean, running_var, batch_mean, batch_var, count, *, conv: Convention, momentum, num_batches_tracked=None
):
    """``keras_bn._ops.update_running_stats`` on torch tensors: the same operations, without ``keras.ops``' conversions.

    ``(new_mean, new_var, valid)`` in the statistics' dtype, spec's weight, Bessel factor and moving average
    (``xp=torch``), unchanged where the batch has too few values (``valid`` False); bit-identical to the
    ``keras.ops`` version (tests/test_keras_torch_backend.py).
    """
    with torch.no_grad():
        dtype = running_mean.dtype
        batch_mean = batch_mean.to(dtype)
        count = count.to(dtype)
        valid = count > 1.0 if conv.running_variance == "unbiased" else count >= 1.0
        batch_var = spec.variance_for_update(conv, batch_var.to(dtype), count, xp=torch)
        n = None if num_batches_tracked is None else num_batches_tracked.to(torch.float64)
        w = spec.new_value_weight(conv, momentum, n, xp=torch)
        # a Python float straight to the statistics' dtype, as the keras.ops version does
        w = torch.tensor(w, dtype=dtype) if isinstance(w, float) else w.to(dtype)
        # Mean and variance stacked into one (2, C) update: each op dispatches once for both (7 ops instead
        # of 10; per-op dispatch, not arithmetic, is the cost at LeNet's sizes: bench_modes --workloads lenet-bn).
        # Elementwise the operations are the same, so the result is bit for bit the unstacked one.
        old = torch.stack((running_mean, running_var))
        new = torch.where(valid, spec.moving_average(old, torch.stack((batch_mean, batch_var)), w), old)
    return new[0], new[1], valid
