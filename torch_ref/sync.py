"""Synchronized Batch Normalization over ``torch.distributed`` (any backend, gloo on CPU included).

Synchronization is a parameter, not a second implementation: the layer is ``torch_ref``'s BN with
an ``all_reduce_sum`` (``dist.all_reduce`` over the process group) through which every per-channel
sum of the forward and backward passes goes (SPEC.md §7), so n, mean, var, dbeta and dgamma are
those of the global batch:

    forward   round 1: all_reduce [sum x, count]          -> shift = sum x / n
              round 2: all_reduce [sum (x-shift), sum (x-shift)^2] -> mean, var  (shifted two-pass)
    backward  round 3: all_reduce [sum dy, sum dy * x_hat] -> dbeta, dgamma of the global batch

Exact for unequal per-rank batch sizes (a rank with an empty batch contributes zeros) and free of
the cancellation in E[x^2] - E[x]^2. The weight and bias gradients returned are this rank's own
sums, as ``torch.nn.SyncBatchNorm`` returns them: DistributedDataParallel's gradient all-reduce
then combines them. Three collective calls per layer per training step.

Second derivatives are not supported across ranks (the backward's all-reduce is not itself
differentiated; a ``create_graph=True`` backward raises); with one rank the layer is the local
``torch_ref`` BN, whose double backward is exact.

``torch.nn.SyncBatchNorm`` itself refuses CPU tensors (its kernels ``batch_norm_stats`` and
``batch_norm_gather_stats_with_counts`` are CUDA-only in torch 2.13); this module runs anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torch_ref.batch_norm import _BatchNorm, _train, batch_norm_options


def all_reduce_sum(group=None) -> Callable[[list[Tensor]], list[Tensor]]:
    """spec's cross-replica sum over ``group`` (default: the world): one ``dist.all_reduce`` per call.

    Takes and returns a list of per-channel tensors (``spec.shifted_moments`` /
    ``spec.backward_closed_form`` sum several at once), concatenated so each round is one collective.
    """

    def sum_over_ranks(sums: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in sums])
        dist.all_reduce(flat, group=group)
        parts = flat.split([s.numel() for s in sums])
        return [part.view_as(s) for part, s in zip(parts, sums, strict=True)]

    return sum_over_ranks


def sync_batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, group=None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN over the batches of every rank in ``group`` (default: the world).

    NC... input; returns ``(y, mean, var, count)`` with the global biased ``var`` and global
    ``count`` (values per channel, a 0-d tensor); ``y`` is differentiable. Every rank must call it.
    """
    y, mean, var, count = _train(x, weight, bias, float(eps), all_reduce_sum(group), 1, None, None, None, None, "torch")
    return y, mean.view(-1), var.view(-1), count


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
        return self._forward(x, True, all_reduce_sum(self.process_group))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every ``torch_ref``/``torch.nn`` BatchNorm*d in ``module`` by this class, sharing its state.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layer takes over the old one's
        Parameter and buffer objects, so dtype, device, ``requires_grad`` and optimizer references
        are kept.
        """
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(
                **batch_norm_options(module),
                process_group=process_group,
                device="meta",  # placeholders only: every tensor is replaced by the module's own below
                bias=module.bias is not None if module.affine else True,
                convention=getattr(module, "convention", "torch"),
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
