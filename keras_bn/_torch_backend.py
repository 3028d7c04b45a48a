"""keras_bn's training step on Keras' torch backend: torch_ref's autograd Function on the layer's own tensors.

On the torch backend a Keras tensor is a ``torch.Tensor``, so the generic training path (no mask, no renorm,
no cross-replica sum) calls ``torch_ref.batch_norm_train`` directly: the same spec formulas (shifted moments,
affine map, coefficient-form backward) without ``keras.ops``' per-call conversion, read in place at the
layer's channel axis (channels_last by default). The layer still decides when the moving statistics change;
their update is ``_ops.update_running_stats`` with ``xp=torch`` (``XP``) on the torch tensors.
"""

from __future__ import annotations

import torch

from torch_ref.batch_norm import batch_norm_train

#: The namespace of the layer's tensors for spec's formulas on this backend
XP = torch


def train(x: torch.Tensor, gamma, beta, epsilon: float, channel_axis: int):
    """``(y, (count, mean, var))`` as the layer's generic path returns them: per-channel (C,) mean and biased
    variance, without gradient (torch_ref marks them non-differentiable), and the count as one Python number,
    the values per channel known from x's shape: the update then checks it on the host, with no tensor op."""
    y, mean, var = batch_norm_train(x, gamma, beta, epsilon, channel_dim=channel_axis)
    channels = x.shape[channel_axis]
    return y, (float(x.numel() // channels) if channels else 0.0, mean, var)
