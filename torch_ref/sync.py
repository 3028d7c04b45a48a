"""Synchronized Batch Normalization over ``torch.distributed`` (any backend, gloo on CPU included).

Per channel c, over the values of all ranks (n = global count, sums over every rank's batch):

    forward   round 1: all_reduce [sum x, count]          -> shift m = sum x / n
              round 2: all_reduce [sum (x-m), sum (x-m)^2] -> mean = m + D1/n, var = D2/n - (D1/n)^2
    backward  round 3: all_reduce [sum dy, sum dy * x_hat] -> dbeta, dgamma of the global batch
              dx = gamma / (n * sigma) * (n * dy - dbeta - x_hat * dgamma)   (spec.batch_norm_backward)

Rounds 1-2 are the corrected two-pass algorithm around a shared shift, as in ``keras_bn.sync``:
exact for unequal per-rank batch sizes (a rank with an empty batch contributes zeros) and free of
the cancellation in E[x^2] - E[x]^2. The weight and bias gradients returned are this rank's own
sums, as ``torch.nn.SyncBatchNorm`` returns them: DistributedDataParallel's gradient all-reduce
then combines them. Three collective calls per layer per training step.

Second derivatives are not supported across ranks (the backward's all-reduce is not itself
differentiated; ``once_differentiable`` marks it); with one rank the layer is the local
``torch_ref`` BN, whose double backward is exact.

``torch.nn.SyncBatchNorm`` itself refuses CPU tensors (its kernels ``batch_norm_stats`` and
``batch_norm_gather_stats_with_counts`` are CUDA-only in torch 2.13); this module runs anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torch_ref.batch_norm import _BatchNorm, _channel_shape, _reduction_dims, check_input, update_running_stats_

#: Collective calls one SyncBatchNorm issues per training step (forward, backward).
COLLECTIVES_PER_STEP = {"forward": 2, "backward": 1}


class _SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode BN on the global batch; returns ``(y, mean, var, count)`` (stats not differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        dims, shape = _reduction_dims(x), _channel_shape(x)
        channels = x.shape[1]
        local_count = x.numel() // channels
        first = torch.cat([x.sum(dim=dims), x.new_tensor([local_count])])
        dist.all_reduce(first, group=group)
        count = first[channels]
        shift = first[:channels] / count.clamp(min=1)  # an empty global batch is rejected by the module
        centered = x - shift.view(shape)
        second = torch.cat([centered.sum(dim=dims), (centered * centered).sum(dim=dims)])
        dist.all_reduce(second, group=group)
        mean_offset = second[:channels] / count.clamp(min=1)
        mean = shift + mean_offset
        var = (second[channels:] / count.clamp(min=1) - mean_offset * mean_offset).clamp(min=0)
        inv_sigma = torch.rsqrt(var + eps)
        x_hat = (centered - mean_offset.view(shape)) * inv_sigma.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.to(x.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(x.dtype).view(shape)
        ctx.save_for_backward(x_hat, inv_sigma, weight, count)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dcount):
        x_hat, inv_sigma, weight, count = ctx.saved_tensors
        dims, shape = _reduction_dims(dy), _channel_shape(dy)
        channels = dy.shape[1]
        local_dbeta = dy.sum(dim=dims)
        local_dgamma = (dy * x_hat).sum(dim=dims)
        sums = torch.cat([local_dbeta, local_dgamma])
        # Every rank must join this all-reduce, including ranks whose x needs no gradient.
        dist.all_reduce(sums, group=ctx.group)
        dbeta, dgamma = sums[:channels], sums[channels:]
        dx = None
        if ctx.needs_input_grad[0]:
            scale = inv_sigma if weight is None else weight.to(dy.dtype) * inv_sigma
            dx = (scale / count).view(shape) * (count * dy - dbeta.view(shape) - x_hat * dgamma.view(shape))
        dweight = local_dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local_dbeta.to(dy.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def sync_batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, group=None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN over the batches of every rank in ``group`` (default: the world).

    NC... input; returns ``(y, mean, var, count)`` with the global biased ``var`` and global
    ``count`` (values per channel, a 0-d tensor); ``y`` is differentiable. Every rank must call it.
    """
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y, mean, var, count = _SyncBatchNormTrain.apply(x.to(compute), weight, bias, float(eps), group)
    return y.to(x.dtype), mean, var, count


class SyncBatchNorm(_BatchNorm):
    """``torch_ref`` BatchNorm with statistics over all ranks of a process group, for N,C,... input.

    Same constructor, state and ``state_dict`` as ``torch_ref.BatchNorm*d`` (plus ``process_group``).
    In training mode with an initialized process group of more than one rank it normalizes with,
    and updates the running statistics from, the global batch; otherwise it is the local layer.
    """

    _ranks = (2, 3, 4, 5)

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self._world_size() == 1:
            return super().forward(x)
        check_input(x, self.num_features, self._input_ranks, self._display_name)
        if not self.eps > 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        y, mean, var, count = sync_batch_norm_train(x, self.weight, self.bias, self.eps, self.process_group)
        count = int(count.item())
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel over all ranks when training, got {count}")
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            if count > 1:  # an empty global batch leaves the statistics, as the local layer does
                update_running_stats_(
                    self.running_mean, self.running_var, self.num_batches_tracked, mean, var, count, self.momentum
                )
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every ``torch_ref``/``torch.nn`` BatchNorm*d in ``module`` by this class, sharing its state.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layer takes over the old one's
        Parameter and buffer objects, so dtype, device, ``requires_grad`` and optimizer references
        are kept.
        """
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
                process_group=process_group,
                device="meta",  # placeholders only: every tensor is replaced by the module's own below
                bias=module.bias is not None if module.affine else True,
            )
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            return new
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module
