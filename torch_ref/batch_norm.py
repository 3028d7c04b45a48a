"""Batch Normalization for PyTorch written from the spec: forward, closed-form backward, PyTorch's bookkeeping.

The math is the spec's (``spec.batch_norm_train`` / ``spec.batch_norm_backward``, SPEC.md), per
channel c over the m values that share it:

    mu = mean(x),  var = mean((x - mu)^2)  (two-pass, biased),  sigma = sqrt(var + eps)
    x_hat = (x - mu) / sigma,  y = gamma * x_hat + beta
    dbeta = sum(dy),  dgamma = sum(dy * x_hat),
    dx = gamma / (m * sigma) * (m * dy - dbeta - x_hat * dgamma)
    (forward mode, the transpose:  dy = gamma / sigma * (dx - mean(dx) - x_hat * mean(x_hat * dx))
                                        + dgamma * x_hat + dbeta)

computed in the input's dtype (float32 or float64; float16/bfloat16 are computed in float32 and
cast back, as ATen does) with torch ops only, so ``torch.compile``, ``torch.jit.script``,
``torch.fx`` and ``torch.func`` see ordinary tensor code. The mean is the *corrected* two-pass
mean (a first estimate, then the mean of the residuals added back), so float32 input with
``|mean| >> std`` keeps the accuracy the spec gets from float64 accumulation. The backward and
the forward-mode derivative recompute ``x_hat`` from the saved input with differentiable ops, so
second derivatives are exact (``gradgradcheck``) rather than silently zero.

The moving statistics follow ``spec.update_running_stats(convention="torch")``: weight
``momentum`` on the new value, Bessel-corrected (unbiased) variance, ``momentum=None`` as a
cumulative average over ``num_batches_tracked``; the arithmetic is float64, like ATen's CPU
kernel. An empty training batch returns an empty output, leaves the statistics and increments
the counter, as ``torch.nn`` does.

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
Function, so scripted code runs the same forward in plain ops and autograd derives its backward;
``torch.fx.symbolic_trace`` records ``batch_norm_module_forward`` as one call with the train/eval
mode of tracing baked in (torch.nn's BN is an fx leaf module, ours is traced like user code).
"""

import math
import numbers

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm


def _channel_shape(x: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against NC... input (channels at dim 1)."""
    return [1, -1] + [1] * (x.dim() - 2)


def _reduction_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_hat, inv_sigma, mean, var)`` of NC... input, per channel, by the corrected two-pass algorithm.

    The first pass estimates the mean; in float32 that estimate is off by ~ulp(|mean|) (5e-4 at
    1e4). The mean of the residuals ``x - estimate`` is computed on small numbers, so adding it
    back recovers the mean to ~ulp(std), and the variance is taken around the corrected mean
    (Chan, Golub & LeVeque 1983, "corrected two-pass"; spec/moments.py gets the same accuracy from
    float64). Differentiable: the backward and jvp call it again to rebuild x_hat from x.
    """
    dims, shape = _reduction_dims(x), _channel_shape(x)
    estimate = x.mean(dim=dims, keepdim=True)
    residual = x - estimate
    correction = residual.mean(dim=dims, keepdim=True)
    centered = residual - correction
    var = (centered * centered).mean(dim=dims)
    inv_sigma = torch.rsqrt(var + eps)
    x_hat = centered * inv_sigma.view(shape)
    mean = (estimate + correction).view(-1)
    return x_hat, inv_sigma, mean, var


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = _channel_shape(x_hat)
    y = x_hat
    if weight is not None:
        y = y * weight.to(x_hat.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(x_hat.dtype).view(shape)
    return y


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BN with the closed-form backward of ``spec.batch_norm_backward`` and its jvp.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` (biased) are not differentiable outputs: their
    dependence on x is already inside the closed-form dx. ``setup_context`` and
    ``generate_vmap_rule`` make it usable under ``torch.func`` (grad, jacrev, vmap, jvp).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        x_hat, _, mean, var = _normalized(x, eps)
        return _affine(x_hat, weight, bias), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        # x (an input) rather than x_hat (an intermediate): saved inputs keep their graph, so the
        # backward below is itself differentiable and double backward is exact.
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
        x, weight = ctx.saved_tensors
        x_hat, inv_sigma, _, _ = _normalized(x, ctx.eps)
        dims, shape = _reduction_dims(dy), _channel_shape(dy)
        m = dy.numel() // dy.shape[1] if dy.shape[1] else 0
        dbeta = dy.sum(dim=dims)
        dgamma = (dy * x_hat).sum(dim=dims)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            scale = inv_sigma if weight is None else weight.to(dy.dtype) * inv_sigma
            # spec.batch_norm_backward, written as mean(dy) and mean(dy * x_hat) (so m = 0 gives an empty dx).
            dx = scale.view(shape) * (dy - (dbeta / max(m, 1)).view(shape) - x_hat * (dgamma / max(m, 1)).view(shape))
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = dgamma.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = dbeta.to(ctx.bias_dtype)
        return dx, dweight, dbias, None


class _BatchNormTrainWithJvp(_BatchNormTrain):
    """``_BatchNormTrain`` plus forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``).

    Separate because TorchDynamo refuses a Function with a custom ``jvp`` (torch 2.13,
    "Unsupported custom jvp"): ``torch.compile`` gets ``_BatchNormTrain``, eager code this one.
    """

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, _deps):
        x, weight = ctx.saved_tensors
        x_hat, inv_sigma, _, _ = _normalized(x, ctx.eps)
        dims, shape = _reduction_dims(x), _channel_shape(x)
        dy = torch.zeros_like(x_hat)
        if dx is not None:
            dx_hat = inv_sigma.view(shape) * (
                dx - dx.mean(dim=dims, keepdim=True) - x_hat * (x_hat * dx).mean(dim=dims, keepdim=True)
            )
            dy = dx_hat if weight is None else dx_hat * weight.to(x.dtype).view(shape)
        if dweight is not None:
            dy = dy + x_hat * dweight.to(x.dtype).view(shape)
        if dbias is not None:
            dy = dy + dbias.to(x.dtype).view(shape)
        return dy, None, None  # mean and var are non-differentiable outputs


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32


def _batch_norm_train_ops(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same forward without the custom Function, for TorchScript (which cannot call one).

    Autograd derives its backward; it is the same function of x, so gradients agree to rounding.
    """
    x_hat, _, mean, var = _normalized(x, eps)
    return _affine(x_hat, weight, bias), mean.detach(), var.detach()


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward on NC... input: ``(y, batch_mean, biased_batch_var)``, differentiable in y."""
    compute = _compute_dtype(x)
    if torch.jit.is_scripting():
        y, mean, var = _batch_norm_train_ops(x.to(compute), weight, bias, float(eps))
    elif torch.compiler.is_compiling():
        y, mean, var = _BatchNormTrain.apply(x.to(compute), weight, bias, float(eps))
    else:
        y, mean, var = _BatchNormTrainWithJvp.apply(x.to(compute), weight, bias, float(eps))
    return y.to(x.dtype), mean, var


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


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """One ``spec.update_running_stats(convention="torch")`` step, in place and in float64 like ATen's CPU kernel.

        w = momentum, or 1 / num_batches_tracked (after incrementing it) for momentum=None
        running_mean = (1 - w) * running_mean + w * batch_mean
        running_var  = (1 - w) * running_var  + w * batch_var * count / (count - 1)

    The caller has already incremented ``num_batches_tracked`` (as torch.nn does, even for an
    empty batch); ``count`` must be > 1.
    """
    with torch.no_grad():
        if momentum is None:
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            weight = 1.0 / num_batches_tracked.to(torch.float64)
        else:
            weight = torch.full((), momentum, dtype=torch.float64, device=running_mean.device)
        unbiased = batch_var.detach().to(torch.float64) * (count / (count - 1.0))
        new_mean = weight * batch_mean.detach().to(torch.float64) + (1.0 - weight) * running_mean.to(torch.float64)
        new_var = weight * unbiased + (1.0 - weight) * running_var.to(torch.float64)
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


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
) -> Tensor:
    """Everything ``BatchNorm*d.forward`` does, as one function (torch.fx records it as a single call).

    Checks the input, normalizes with batch statistics (training, or no buffers) or the stored
    ones, and updates the buffers in training mode, following ``torch.nn.BatchNorm*d.forward``.
    """
    check_input(x, num_features, ranks, name)
    use_batch_stats = training or (running_mean is None and running_var is None)
    if use_batch_stats:
        _check_dtypes(x, name, [weight, bias], ["weight", "bias"])
        if training and track_running_stats:
            _check_dtypes(x, name, [running_mean, running_var], ["running_mean", "running_var"])
    else:
        _check_dtypes(
            x, name, [weight, bias, running_mean, running_var], ["weight", "bias", "running_mean", "running_var"]
        )
    if not use_batch_stats:
        if eps < 0.0:  # torch.nn.functional.batch_norm's check and message
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        assert running_mean is not None and running_var is not None
        return batch_norm_infer(x, weight, bias, running_mean, running_var, eps)
    count = x.numel() // num_features
    if training and count == 1:  # torch.nn.functional._verify_batch_size's message; 0 values is legal
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if training and eps <= 0.0:  # torch.nn.functional.batch_norm's check and message
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    y, mean, var = batch_norm_train(x, weight, bias, eps)
    if training and track_running_stats and running_mean is not None and running_var is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if count > 1:  # an empty batch leaves the statistics (torch.nn: ATen returns before updating)
            update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    return y


# torch.fx: record the whole forward as one call (its checks branch on shapes, which a Proxy cannot).
torch.fx.wrap("batch_norm_module_forward")


def _check_arguments(
    num_features: object, eps: object, momentum: object, affine: object, track_running_stats: object, bias: object
) -> None:
    """Type and range checks at construction; torch.nn checks none of these (a stricter drop-in)."""
    # numbers.Integral/Real: NumPy scalars (np.int64, np.float32) are accepted as torch.nn accepts them.
    if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    # eps <= 0 is refused at forward time, in torch.nn's words (eps = 0 is legal in eval mode).
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite real number, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
    for label, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{label} must be a bool, got {value!r}")


class _BatchNorm(_TorchBatchNorm):
    """Bookkeeping shared by BatchNorm1d/2d/3d: torch.nn's parameters, buffers and state_dict; our forward."""

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
    ) -> None:
        _check_arguments(num_features, eps, momentum, affine, track_running_stats, bias)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        # Instance attributes: TorchScript sees neither class attributes nor the class name.
        self._input_ranks = list(self._ranks)
        self._display_name = type(self).__name__

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # done in batch_norm_module_forward, with the other checks

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_module_forward(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.num_features,
            self._input_ranks,
            self._display_name,
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
