"""Batch Normalization for PyTorch written from the spec: forward, closed-form backward, PyTorch's bookkeeping.

The math is the spec's (``spec.batch_norm_train`` / ``spec.batch_norm_backward``, SPEC.md §2 and §4),
per channel c over the m values that share it (over every replica's batch when synchronized, §7):

    shift = mean(x),  c = x - shift,  d = mean(c)              (shifted two-pass moments, §8)
    mu = shift + d,  var = mean(c^2) - d^2  (biased),  sigma = sqrt(var + eps)
    x_hat = (x - mu) / sigma,  y = gamma * x_hat + beta
    dbeta = sum(dy),  dgamma = sum(dy * x_hat),
    dx = gamma / (m * sigma) * (m * dy - dbeta - x_hat * dgamma)
    (forward mode, the transpose:  dy = gamma / sigma * (dx - mean(dx) - x_hat * mean(x_hat * dx))
                                        + dgamma * x_hat + dbeta)

computed in the input's dtype (float32 or float64; float16/bfloat16 are computed in float32 and
cast back, as ATen does) with torch ops only, so ``torch.compile``, ``torch.jit.script``,
``torch.fx`` and ``torch.func`` see ordinary tensor code. The shift is a first estimate of the
mean; the residuals ``c`` are small numbers, so float32 input with ``|mean| >> std`` keeps the
accuracy the spec gets from float64 accumulation (Chan, Golub & LeVeque 1983). Every sum can be
taken over all replicas by an ``all_reduce_sum`` callable (``torch_ref.sync``); without one the
layer is local. The backward works from the saved input and statistics (a few passes over x,
no saved normalized copy); under ``create_graph=True`` it rebuilds the statistics from x with
differentiable ops, so second derivatives are exact (``gradgradcheck``) rather than silently zero.

The moving statistics follow ``spec.update_running_stats`` in the layer's ``convention`` (default
"torch": weight ``momentum`` on the new value, Bessel-corrected (unbiased) variance,
``momentum=None`` as a cumulative average over ``num_batches_tracked``); ``momentum`` keeps
PyTorch's meaning (the weight of the new batch) in every convention and is converted by
``spec.convert_momentum``. The arithmetic is float64, like ATen's CPU kernel. An empty training
batch returns an empty output, leaves the statistics and increments the counter, as ``torch.nn`` does.

The modules subclass ``torch.nn.modules.batchnorm._BatchNorm``, so ``isinstance`` checks,
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``
and version-1 checkpoints (no ``num_batches_tracked``) behave as with ``torch.nn.BatchNorm*d``;
only ``forward`` is ours. Deliberate differences from ``torch.nn`` (each tested in
tests/test_torch_module_db.py): constructor arguments are validated by type and range (torch
accepts e.g. ``num_features=0`` or ``momentum=1.5``), a channel-count mismatch and a
non-floating input raise ``ValueError`` / ``TypeError`` naming the problem instead of ATen's
``RuntimeError`` / ``NotImplementedError``.

Under program transforms (tests/test_torch_transforms.py): ``torch.compile`` uses the Function
without its ``jvp`` (TorchDynamo refuses custom jvps); ``torch.jit.script`` cannot call a custom
Function, so scripted code runs the same forward in plain ops and autograd derives its backward
(conventions other than "torch" take their update coefficients from ``spec`` through
``torch.jit.ignore``); ``torch.fx.symbolic_trace`` records ``batch_norm_module_forward`` as one
call with the train/eval mode of tracing baked in (torch.nn's BN is an fx leaf module, ours is
traced like user code).
"""

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

import spec


def _channel_shape(x: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against NC... input (channels at dim 1)."""
    return [1, -1] + [1] * (x.dim() - 2)


def _reduction_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _replica_sums(sums: list[Tensor], all_reduce_sum: Any) -> list[Tensor]:
    """``sums`` summed over every replica by one ``all_reduce_sum`` call (SPEC.md §7); None: this batch only.

    ``all_reduce_sum`` is ``Callable[[Tensor], Tensor] | None``, typed ``Any`` because TorchScript
    has no callable arguments (scripted code is always local).
    """
    if not torch.jit.is_scripting():
        if all_reduce_sum is not None:
            return list(all_reduce_sum(torch.cat(sums)).split([s.numel() for s in sums]))
    return sums


def _shifted_moments(x: Tensor, all_reduce_sum: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(centered, d, mean, var, count)`` of NC... input per channel, by shifted two-pass moments (SPEC.md §8).

        shift = sum(x) / n,  centered = x - shift,  d = sum(centered) / n
        mean = shift + d,    var = sum(centered^2) / n - d^2    (biased; n and sums over all replicas)

    In float32 the shift is off by ~ulp(|mean|) (5e-4 at 1e4); ``d`` is computed on small numbers,
    so the mean comes back to ~ulp(std) and the variance carries no cancellation (spec/moments.py
    gets the same accuracy from float64). ``count`` is a 0-d tensor; an empty batch gives NaN
    statistics. Differentiable: the backward and jvp call it again to rebuild the statistics from x.
    """
    dims, shape = _reduction_dims(x), _channel_shape(x)
    local_count = x.numel() // x.shape[1] if x.shape[1] else 0
    sum_x, count = _replica_sums([x.sum(dim=dims), x.new_full([1], float(local_count))], all_reduce_sum)
    shift = sum_x / count
    centered = x - shift.view(shape)
    sum_c, sum_c2 = _replica_sums([centered.sum(dim=dims), (centered * centered).sum(dim=dims)], all_reduce_sum)
    d = sum_c / count
    var = (sum_c2 / count - d * d).clamp_min(0.0)  # >= 0 in exact arithmetic; rounding may dip below
    return centered, d, shift + d, var, count.view([])


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _normalized_affine(
    centered: Tensor, d: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(y, inv_sigma)``: ``y = gamma * (centered - d) / sigma + beta`` as one scale and shift (SPEC.md §2).

    Per channel ``scale = gamma / sigma`` and ``offset = beta - d * scale``, then ``y = centered *
    scale + offset``, the same function of x as normalizing then scaling. Where autograd is not
    recording (inside the Function) it runs in place on ``centered``, a temporary: on CPU a fresh
    x-sized tensor costs more than the arithmetic.
    """
    shape = _channel_shape(centered)
    inv_sigma = torch.rsqrt(var + eps)
    scale = inv_sigma if weight is None else inv_sigma * _as(weight, centered.dtype)
    offset = -d * scale if bias is None else _as(bias, centered.dtype) - d * scale
    if torch.is_grad_enabled():
        return centered * scale.view(shape) + offset.view(shape), inv_sigma
    return centered.mul_(scale.view(shape)).add_(offset.view(shape)), inv_sigma


def _closed_form_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv_sigma: Tensor, count: Tensor, all_reduce_sum: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, local dgamma, local dbeta)`` of ``spec.batch_norm_backward`` (SPEC.md §4), dgamma/dbeta global in dx.

        dx = a * dy + b * (x - mean) + c,  a = gamma / sigma,  b = -a * dgamma / (m * sigma),  c = -a * dbeta / m

    (the closed form with x_hat = (x - mean) / sigma folded into per-channel coefficients). The
    returned dgamma/dbeta are this replica's own sums, as ``torch.nn.SyncBatchNorm`` returns them
    (DistributedDataParallel all-reduces parameter grads).
    """
    dims, shape = _reduction_dims(dy), _channel_shape(dy)
    x_centered = x - mean.view(shape)
    local_dbeta = dy.sum(dim=dims)
    local_dgamma = (dy * x_centered).sum(dim=dims) * inv_sigma
    if x.numel() == 0:  # sums over no values are 0 (SPEC.md §9), also where inv_sigma is NaN
        local_dgamma = torch.zeros_like(local_dbeta)
    dbeta, dgamma = _replica_sums([local_dbeta, local_dgamma], all_reduce_sum)
    a = inv_sigma if weight is None else _as(weight, dy.dtype) * inv_sigma
    b = -a * inv_sigma * dgamma / count
    c = -a * dbeta / count
    a, b, c = a.view(shape), b.view(shape), c.view(shape)
    if torch.is_grad_enabled():  # create_graph=True: out of place, so autograd can differentiate it
        return dy * a + x_centered * b + c, local_dgamma, local_dbeta
    # In place on the temporary x_centered: no further x-sized allocation (see _normalized_affine).
    dx = x_centered.mul_(b).addcmul_(dy, a).add_(c)
    return dx, local_dgamma, local_dbeta


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BN with the closed-form backward of ``spec.batch_norm_backward``, local or synchronized.

    ``forward(x, weight, bias, eps, all_reduce_sum)`` returns ``(y, mean, var, inv_sigma, count)``;
    only ``y`` is differentiable: the statistics' dependence on x is already inside the closed-form
    dx. ``setup_context`` and ``generate_vmap_rule`` make it usable under ``torch.func`` (grad,
    jacrev, vmap, jvp). With an ``all_reduce_sum`` every sum is global, and second derivatives are
    refused (the backward's all-reduce is not itself differentiated).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, all_reduce_sum: Any = None):
        centered, d, mean, var, count = _shifted_moments(x, all_reduce_sum)
        y, inv_sigma = _normalized_affine(centered, d, var, weight, bias, eps)
        return y, mean, var, inv_sigma, count

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps, all_reduce_sum = inputs
        _, mean, var, inv_sigma, count = output
        ctx.eps, ctx.all_reduce_sum = eps, all_reduce_sum
        ctx.bias_dtype = None if bias is None else bias.dtype
        # x (an input) rather than a normalized copy: saved inputs keep their graph, so the
        # backward below is itself differentiable and double backward is exact.
        ctx.save_for_backward(x, weight, mean, inv_sigma, count)
        ctx.save_for_forward(x, weight)
        ctx.mark_non_differentiable(mean, var, inv_sigma, count)

    @staticmethod
    def backward(ctx, dy: Tensor, *_statistics_grads: Tensor):
        x, weight, mean, inv_sigma, count = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the statistics as differentiable functions of x
            if ctx.all_reduce_sum is not None:
                raise RuntimeError("second derivatives through a synchronized BN (all_reduce_sum) are not supported")
            _, _, mean, var, count = _shifted_moments(x)
            inv_sigma = torch.rsqrt(var + ctx.eps)
        dx, dgamma, dbeta = _closed_form_backward(dy, x, weight, mean, inv_sigma, count, ctx.all_reduce_sum)
        dweight = dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbeta.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, dweight, dbias, None, None


class _BatchNormTrainWithJvp(_BatchNormTrain):
    """``_BatchNormTrain`` plus forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``), local only.

    Separate because TorchDynamo refuses a Function with a custom ``jvp`` (torch 2.13,
    "Unsupported custom jvp"): ``torch.compile`` gets ``_BatchNormTrain``, eager code this one.
    """

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_):
        x, weight = ctx.saved_tensors
        centered, d, _, var, _ = _shifted_moments(x)
        dims, shape = _reduction_dims(x), _channel_shape(x)
        inv_sigma = torch.rsqrt(var + ctx.eps).view(shape)
        x_hat = (centered - d.view(shape)) * inv_sigma
        dy = torch.zeros_like(x_hat)
        if dx is not None:
            dx_hat = inv_sigma * (
                dx - dx.mean(dim=dims, keepdim=True) - x_hat * (x_hat * dx).mean(dim=dims, keepdim=True)
            )
            dy = dx_hat if weight is None else dx_hat * weight.to(x.dtype).view(shape)
        if dweight is not None:
            dy = dy + x_hat * dweight.to(x.dtype).view(shape)
        if dbias is not None:
            dy = dy + dbias.to(x.dtype).view(shape)
        return dy, None, None, None, None  # the statistics are non-differentiable outputs


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32


def _batch_norm_train_ops(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same forward without the custom Function, for TorchScript (which cannot call one).

    Autograd derives its backward; it is the same function of x, so gradients agree to rounding.
    """
    centered, d, mean, var, _ = _shifted_moments(x)
    y, _ = _normalized_affine(centered, d, var, weight, bias, eps)
    return y, mean.detach(), var.detach()


def _train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, all_reduce_sum: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, count)`` in x's dtype (statistics in the compute dtype): the one training entry point."""
    compute = _compute_dtype(x)
    xc = _as(x, compute)
    if torch.jit.is_scripting():
        y, mean, var = _batch_norm_train_ops(xc, weight, bias, eps)
        count = torch.full([], float(x.numel() // x.shape[1] if x.shape[1] else 0), dtype=compute)
    elif torch.compiler.is_compiling() or all_reduce_sum is not None:
        y, mean, var, _, count = _BatchNormTrain.apply(xc, weight, bias, eps, all_reduce_sum)
    else:
        y, mean, var, _, count = _BatchNormTrainWithJvp.apply(xc, weight, bias, eps, None)
    return _as(y, x.dtype), mean, var, count


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward on NC... input: ``(y, batch_mean, biased_batch_var)``, differentiable in y."""
    y, mean, var, _ = _train(x, weight, bias, float(eps), None)
    return y, mean, var


def batch_norm_infer(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float = 1e-5
) -> Tensor:
    """Inference-mode forward: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with stored statistics."""
    compute = _compute_dtype(x)
    shape = _channel_shape(x)
    scale = torch.rsqrt(var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    y = (x.to(compute) - mean.to(compute).view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(x.dtype)


@torch.jit.ignore
def _spec_new_value_weight(convention: str, momentum: float | None, batches_before: int) -> float:
    """``w`` of ``spec.new_value_weight`` for ``momentum`` in PyTorch's meaning, converted to the convention's."""
    conv = spec.get_convention(convention)
    if momentum is not None:
        momentum = spec.convert_momentum(momentum, "torch", convention)
    return spec.new_value_weight(conv, momentum, batches_before)


@torch.jit.ignore
def _spec_unbiased(convention: str) -> bool:
    return spec.get_convention(convention).running_variance == "unbiased"


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float | None,
    convention: str = "torch",
) -> None:
    """One ``spec.update_running_stats`` step in ``convention`` (SPEC.md §5), in place, float64 like ATen's CPU kernel.

        w = the convention's weight on the new value (``spec.new_value_weight``; for "torch" with
            momentum=None, 1 / num_batches_tracked after incrementing it)
        running_mean = (1 - w) * running_mean + w * batch_mean
        running_var  = (1 - w) * running_var  + w * batch_var * (count / (count - 1) if unbiased else 1)

    ``momentum`` has PyTorch's meaning in every convention. The caller has already incremented
    ``num_batches_tracked`` (as torch.nn does, even for an empty batch); ``count`` must be > 1.
    """
    with torch.no_grad():
        if convention == "torch":  # spec's torch row, kept in torch ops so TorchScript and torch.compile see it
            weight, unbiased = momentum, True
        else:
            assert num_batches_tracked is not None, "a convention other than torch needs num_batches_tracked"
            weight = _spec_new_value_weight(convention, momentum, int(num_batches_tracked) - 1)
            unbiased = _spec_unbiased(convention)
        old = torch.stack([running_mean, running_var]).to(torch.float64)
        new = torch.stack([batch_mean.detach(), batch_var.detach()]).to(torch.float64)
        if unbiased:
            new[1].mul_(count / (count - 1.0))
        if weight is None:  # cumulative average (SPEC.md §5, torch momentum=None)
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            w = 1.0 / num_batches_tracked.to(torch.float64)
            blended = w * new + (1.0 - w) * old
        else:
            blended = weight * new + (1.0 - weight) * old
        running_mean.copy_(blended[0])
        running_var.copy_(blended[1])


def _check_dtypes(x: Tensor, name: str, tensors: list[Tensor | None], labels: list[str]) -> None:
    """torch.nn's rule: parameters and buffers have the input's dtype, or float32 under float16/bfloat16 input."""
    for index in range(len(tensors)):  # no zip(): TorchScript has no zip(strict=...)
        tensor, label = tensors[index], labels[index]
        if tensor is not None and tensor.dtype != x.dtype:
            reduced_input = x.dtype == torch.float16 or x.dtype == torch.bfloat16
            if not (reduced_input and tensor.dtype == torch.float32):
                raise RuntimeError(
                    f"mixed dtype: {name}'s {label} is {tensor.dtype} but the input is {x.dtype} "
                    f"(convert the module with .to({x.dtype}) or the input with .to({tensor.dtype}))"
                )


def check_input(x: Tensor, num_features: int, ranks: list[int], name: str) -> None:
    """A floating tensor of an accepted rank with ``num_features`` channels at dim 1."""
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got {x.dtype}")
    if x.dim() not in ranks:
        expected = " or ".join([f"{r}D" for r in ranks])
        raise ValueError(f"{name} expects {expected} input (N, C, ...), got {x.dim()}D {list(x.shape)}")
    if x.shape[1] != num_features:
        raise ValueError(f"{name}({num_features}) got {x.shape[1]} channels at dim 1 (input {list(x.shape)})")


def _check_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's checks and messages (eps = 0 is legal in eval mode)."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def batch_norm_module_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    num_features: int,
    ranks: list[int],
    name: str,
    convention: str = "torch",
    all_reduce_sum: Any = None,
) -> Tensor:
    """Everything ``BatchNorm*d.forward`` does, as one function (torch.fx records it as a single call).

    Checks the input, normalizes with batch statistics (training, or no buffers) or the stored
    ones, and updates the buffers in training mode, following ``torch.nn.BatchNorm*d.forward``.
    ``all_reduce_sum`` (``torch_ref.sync``) makes every batch statistic global.
    """
    check_input(x, num_features, ranks, name)
    use_batch_stats = training or (running_mean is None and running_var is None)
    if not use_batch_stats:
        _check_dtypes(
            x, name, [weight, bias, running_mean, running_var], ["weight", "bias", "running_mean", "running_var"]
        )
        _check_eps(eps, False)
        assert running_mean is not None and running_var is not None
        return batch_norm_infer(x, weight, bias, running_mean, running_var, eps)
    _check_dtypes(x, name, [weight, bias], ["weight", "bias"])
    update = training and track_running_stats and running_mean is not None and running_var is not None
    if update:
        _check_dtypes(x, name, [running_mean, running_var], ["running_mean", "running_var"])
    if training and all_reduce_sum is None and x.numel() == num_features:
        # torch.nn.functional._verify_batch_size's message; 0 values is legal (SPEC.md §9)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    _check_eps(eps, training)
    y, mean, var, count_tensor = _train(x, weight, bias, eps, all_reduce_sum)
    count = x.numel() // num_features if all_reduce_sum is None else int(count_tensor.item())
    if training and all_reduce_sum is not None and count == 1:
        raise ValueError(f"Expected more than 1 value per channel over all ranks when training, got {count}")
    if update:
        assert running_mean is not None and running_var is not None
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if count > 1:  # an empty batch leaves the statistics (torch.nn: ATen returns before updating)
            update_running_stats_(
                running_mean, running_var, num_batches_tracked, mean, var, count, momentum, convention
            )
    return y


# torch.fx: record the whole forward as one call (its checks branch on shapes, which a Proxy cannot).
torch.fx.wrap("batch_norm_module_forward")


def _check_arguments(
    num_features: object,
    eps: object,
    momentum: object,
    affine: object,
    track_running_stats: object,
    bias: object,
    convention: object,
) -> None:
    """Type and range checks at construction; torch.nn checks none of these (a stricter drop-in).

    The convention and momentum are checked by ``spec`` (its messages): momentum in PyTorch's
    meaning, ``None`` (cumulative average) only where the convention defines it.
    """
    # numbers.Integral/Real: NumPy scalars (np.int64, np.float32) are accepted as torch.nn accepts them.
    if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    # eps <= 0 is refused at forward time, in torch.nn's words (eps = 0 is legal in eval mode).
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite real number, got {eps!r}")
    conv = spec.get_convention(convention)
    if momentum is None:
        spec.new_value_weight(conv, None, 0)  # raises where the convention has no cumulative average
    else:
        spec.convert_momentum(momentum, "torch", conv.name)
    for label, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{label} must be a bool, got {value!r}")


class _BatchNorm(_TorchBatchNorm):
    """Bookkeeping shared by BatchNorm1d/2d/3d: torch.nn's parameters, buffers and state_dict; our forward.

    ``convention`` (a ``spec.CONVENTIONS`` name, default "torch") says how training updates the
    running statistics (SPEC.md §5); ``momentum`` keeps PyTorch's meaning, the weight of the new batch.
    """

    _ranks: list[int] = []

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention: str = "torch",
    ) -> None:
        _check_arguments(num_features, eps, momentum, affine, track_running_stats, bias, convention)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.convention = convention
        # Instance attributes: TorchScript sees neither class attributes nor the class name.
        self._input_ranks = list(self._ranks)
        self._display_name = type(self).__name__

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # done in batch_norm_module_forward, with the other checks

    def extra_repr(self) -> str:
        # torch.nn's repr where the convention is torch's own (a drop-in prints the same).
        convention = "" if self.convention == "torch" else f", convention={self.convention!r}"
        return super().extra_repr() + convention

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, self.training)

    def _forward(self, x: Tensor, training: bool, all_reduce_sum: Any = None) -> Tensor:
        """``forward`` in the given mode, with every batch sum taken by ``all_reduce_sum`` (None: local)."""
        return batch_norm_module_forward(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.num_features,
            self._input_ranks,
            self._display_name,
            self.convention,
            all_reduce_sum,
        )


class BatchNorm1d(_BatchNorm):
    """BN over (N, C) or (N, C, L) input; drop-in for ``torch.nn.BatchNorm1d``."""

    _ranks = [2, 3]


class BatchNorm2d(_BatchNorm):
    """BN over (N, C, H, W) input; drop-in for ``torch.nn.BatchNorm2d``."""

    _ranks = [4]


class BatchNorm3d(_BatchNorm):
    """BN over (N, C, D, H, W) input; drop-in for ``torch.nn.BatchNorm3d``."""

    _ranks = [5]
