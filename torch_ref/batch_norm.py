"""Batch Normalization for PyTorch on the spec's formulas: forward, closed-form backward, PyTorch's bookkeeping.

The math is spec's own functions called on torch tensors (``xp=_TORCH``; SPEC.md §2-§5, §7, §8),
per channel c over the m values that share it (over every replica's batch when synchronized):

    spec.shifted_moments       shift = mean(x), delta = mean(x - shift), mu = shift + delta,
                               var = mean((x - shift)^2) - delta^2  (biased)
    spec.inference_affine      scale = gamma / sqrt(var + eps), offset = beta - mean * scale
    spec.normalize             y = (x - mean) * scale + beta
    spec.backward_coefficient_form  dx = gamma / (m * sigma) * (m * dy - dbeta - x_hat * dgamma),
                               as dx = a * dy + b * (x - mean) + c with per-channel a, b, c
    spec.batch_norm_tangent    the jvp, dy = gamma / sigma * (dx - mean(dx) - x_hat * mean(x_hat * dx)) + ...
    spec.new_value_weight, spec.variance_for_update, spec.moving_average   (the running statistics)

This module adds only PyTorch's bookkeeping: the autograd Function, dtypes (float32 or float64;
float16/bfloat16 are computed in float32 and cast back, as ATen does), checks and buffers. The
shift keeps float32 input with ``|mean| >> std`` at the accuracy the spec gets from float64. Every
sum can be taken over all replicas by an ``all_reduce_sum`` (``torch_ref.sync``); without one the
layer is local. The backward rebuilds x_hat from the saved input and statistics; under
``create_graph=True`` it recomputes the statistics from x with differentiable ops, so second
derivatives are exact (``gradgradcheck``). The forward-mode derivative (jvp) is ``spec.batch_norm_tangent``.
``batch_norm_train`` takes the channels at any ``channel_dim`` (Keras' torch backend trains channels_last
with it), read in place. Eagerly on CPU (no autograd recording inside the step, no graph capture), the local
step's forward and backward replay spec's op sequence as recorded once per configuration (``torch_ref._replay``:
TorchScript's interpreter runs the same kernels in the same order, the same bits, without the Python between them).

The moving statistics follow ``spec.update_running_stats`` in the layer's ``convention`` (default
"torch": weight ``momentum`` on the new value, Bessel-corrected (unbiased) variance,
``momentum=None`` as a cumulative average over ``num_batches_tracked``); ``momentum`` keeps
PyTorch's meaning (the weight of the new batch) in every convention and is converted by
``spec.convert_momentum``. The arithmetic is float64, like ATen's CPU kernel: in an eager local training step
torch ops recorded and replayed with the forward (as ATen's kernel updates inside the forward), elsewhere on plain
CPU tensors spec's NumPy functions on the buffers' memory (fewer dispatches), else torch ops, which a graph capture
(``torch.compile``, ``torch.jit.trace``) records; the same operations and bits every way. An empty training
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
without its ``jvp`` (TorchDynamo refuses custom jvps); ``torch.jit.script`` compiles the checks
and bookkeeping and calls the spec formulas back in Python (``torch.jit.ignore``: TorchScript
cannot compile namespace-generic code), so a scripted module runs but cannot be saved with
``torch.jit.save``; ``torch.fx.symbolic_trace`` records ``batch_norm_module_forward`` as one
call with the train/eval mode of tracing baked in (torch.nn's BN is an fx leaf module, ours is
traced like user code).
"""

import contextlib
import functools
import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

import spec
import spec.arrays
from torch_ref import _replay


def _channel_shape(x: Tensor, channel_dim: int = 1) -> list[int]:
    """Shape that broadcasts a per-channel vector against x (channels at ``channel_dim``, 1 for NC...)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return shape


def _reduction_dims(x: Tensor, channel_dim: int = 1) -> list[int]:
    """Every dim but the channels': BN statistics are per channel (``channel_dim`` non-negative)."""
    return [d for d in range(x.dim()) if d != channel_dim]


#: The array namespace every spec call here gets (``xp=``).
_TORCH = spec.arrays.namespace(torch)
#: The same for a call whose tensors :func:`_namespace_for` has checked once: in-place reuse without per-op checks.
_TORCH_PLAIN = spec.arrays.Namespace(torch, plain_tensors=True)


def _namespace_for(*tensors: Tensor | None) -> spec.arrays.Namespace:
    """``_TORCH_PLAIN`` where every tensor is plain and nothing records or traces, else ``_TORCH``.

    Checked once per forward or backward instead of before each of its in-place operations
    (``spec.arrays.Namespace._may_overwrite``, ~7 us each): the tensors spec forms from plain inputs
    are plain too. Wrapped are ``torch.func`` tensors (under an active transform) and the legacy batched
    tensors of gradcheck's batched-gradient check (a cotangent can be one while x is not).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _TORCH
    # the very test _may_overwrite makes per op (its compile case is settled above)
    if spec.arrays.wrapped_tensors(torch, tensors):
        return _TORCH
    return _TORCH_PLAIN


def _spec_all_reduce_sum(all_reduce_sum: Any) -> Any:
    return spec.identity if all_reduce_sum is None else all_reduce_sum


def _statistics(
    x: Tensor,
    all_reduce_sum: Any = None,
    return_centered: bool = False,
    channel_dim: int = 1,
    xp: spec.arrays.Namespace = _TORCH,
) -> Any:
    """``spec.shifted_moments`` of x over every dim but the channels' (SPEC.md §2, §7, §8).

    Keepdims ``(count, mean, var, shift, delta)``: the shift is a first estimate of the mean and
    ``delta`` its correction, computed on the small residuals ``x - shift``, so float32 input with
    ``|mean| >> std`` keeps the accuracy the spec gets from float64. Differentiable (the backward
    under ``create_graph=True`` and the jvp call it again to rebuild the statistics from x).
    ``return_centered=True``: ``(stats, x - shift)``, the difference the second round computed.
    """
    return spec.shifted_moments(
        x,
        _reduction_dims(x, channel_dim),
        all_reduce_sum=_spec_all_reduce_sum(all_reduce_sum),
        return_centered=return_centered,
        count_as_number=True,
        xp=xp,
    )


def _keepdims(parameter: Tensor | None, x: Tensor, channel_dim: int = 1) -> Tensor | None:
    """A per-channel vector in x's dtype, shaped to broadcast against x (as it is where the channels are last)."""
    if parameter is None:
        return None
    parameter = _as(parameter, x.dtype)
    return parameter if channel_dim == x.dim() - 1 else parameter.view(_channel_shape(x, channel_dim))


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


#: spec's op sequences of the local training step, recorded per configuration (torch_ref._replay)
_REPLAYS = _replay.Recorder()


class _Update(NamedTuple):
    """A local training step's moving-statistics update: :func:`update_running_stats_`'s arguments but the batch's."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    count: int
    momentum: float | None
    convention: str

    def apply(self, mean: Tensor, var: Tensor) -> None:
        """Update the buffers from the batch's ``mean`` and biased ``var`` (on the host where they allow it)."""
        _update_statistics(self, mean, var, host=_host_arrays((self.running_mean, self.running_var, mean, var)))

    def buffers(self) -> tuple[Tensor, ...]:
        """The buffers it writes or reads: the running statistics, then ``num_batches_tracked`` where there is one."""
        counter = self.num_batches_tracked
        return (self.running_mean, self.running_var) + (() if counter is None else (counter,))

    def key(self, buffers: tuple[Tensor, ...]) -> tuple:
        """What a recording of the update reads: the rule, the count and the layouts of its ``buffers()``."""
        return (self.count, self.momentum, self.convention, *map(_layout, buffers))

    def on(self, buffers: tuple[Tensor, ...]) -> "_Update":
        """The same update of other buffers (a recording's inputs), given as :meth:`buffers` orders them."""
        return self._replace(**dict(zip(("running_mean", "running_var", "num_batches_tracked"), buffers, strict=False)))


def _training_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    all_reduce_sum: Any,
    channel_dim: int,
    update: _Update | None = None,
) -> tuple[Tensor, ...]:
    """:func:`_spec_training_forward`, then ``update`` (if given) from the batch's statistics; replayed, the update
    included, where the configuration has been recorded (torch_ref._replay).

    Why the update is recorded with the forward: run after it, spec's update is ~20 NumPy operations and their
    Python, right after the forward's x-sized passes have emptied the caches: LeNet's training loop (2 threads)
    takes 0.974 (0.969..0.978) and 0.983 (0.978..0.988) of the time with it recorded (two runs of 2000 paired
    single steps, Intel Xeon). Recorded, they are ATen's float64 ops in TorchScript's interpreter:
    :func:`update_running_stats_`'s torch form, whose bits equal its NumPy form's
    (tests/test_torch_batch_norm.py::test_host_and_torch_updates_have_the_same_bits).
    """
    buffers = () if update is None else update.buffers()
    xp = _namespace_for(x, weight, bias, *buffers)
    if all_reduce_sum is None and xp is _TORCH_PLAIN and _replay.allowed(x):
        has_weight, has_bias = weight is not None, bias is not None
        tensors = [t for t in (x, weight, bias) if t is not None]

        def recorded(*tensors: Tensor) -> tuple[Tensor, ...]:
            parameters = iter(tensors[1:])
            weight = next(parameters) if has_weight else None
            bias = next(parameters) if has_bias else None
            outputs = _spec_training_forward(tensors[0], weight, bias, eps, None, channel_dim, _replay.RECORDING)
            if update is not None:  # the buffers are the recording's last inputs
                _update_statistics(
                    update.on(tensors[len(tensors) - len(buffers) :]), outputs[1], outputs[2], host=False
                )
            return outputs

        # everything the recorded Python reads: the constants, the tensors' layouts and dtypes (a parameter in
        # another dtype is cast: one more op), which parameters exist, and the update's rule and buffers
        update_key = None if update is None else update.key(buffers)
        key = ("forward", eps, channel_dim, _layout(x), _layout(weight), _layout(bias), update_key)
        # recorded on copies of the buffers, which the update writes
        replay = _REPLAYS(key, recorded, lambda: tensors + [b.clone() for b in buffers])
        if replay is not None:
            return replay(*tensors, *buffers)
    outputs = _spec_training_forward(x, weight, bias, eps, all_reduce_sum, channel_dim, xp)
    if update is not None:  # the recording's torch ops, one at a time (torch_ref._replay.op_by_op: the same ops)
        _update_statistics(update, outputs[1], outputs[2], host=False)
    return outputs


def _layout(t: Tensor | None) -> tuple | None:
    """What a recording reads of a tensor: shape, strides (views, contiguity) and dtype; None for no tensor."""
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _spec_training_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    all_reduce_sum: Any,
    channel_dim: int,
    xp: spec.arrays.Namespace,
) -> tuple[Tensor, ...]:
    """``(y, mean, var, inv_sigma, scale)``, plus ``count`` when synchronized; statistics keepdims, y by spec's
    affine map. ``scale = gamma * inv_sigma`` (``inv_sigma`` itself without gamma) goes to the backward, which
    needs the same factor: computing it there again would be one more view and product per step.

    ``spec.inference_affine`` applied to (delta, var) gives ``scale = gamma / sigma`` and
    ``offset = beta - delta * scale``, so ``y = (x - shift) * scale + offset = (x - mean) * scale + beta``
    with the large shift subtracted before any rounding of the scaled values (SPEC.md §2, §3, §8). ``x - shift``
    is the statistics' own temporary, reused for y (autograd does not record inside the Function). A local
    count is x's shape, known to every caller: no tensor is made for it.
    """
    stats, centered = _statistics(x, all_reduce_sum, return_centered=True, channel_dim=channel_dim, xp=xp)
    scale, offset, inv_sigma = spec.inference_affine(
        stats.delta,
        stats.var,
        _keepdims(weight, x, channel_dim),
        _keepdims(bias, x, channel_dim),
        eps=eps,
        xp=xp,
        return_inv_sigma=True,
    )
    y = spec.normalize(centered, scale, offset, xp=xp, overwrite_centered=True)
    if all_reduce_sum is None:
        return y, stats.mean, stats.var, inv_sigma, scale
    return y, stats.mean, stats.var, inv_sigma, scale, stats.count


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BN with spec's closed-form backward (``spec.backward_coefficient_form``), local or synchronized.

    ``forward(x, weight, bias, eps, all_reduce_sum, channel_dim, update)`` returns ``(y, mean, var, inv_sigma,
    scale)``, and the global ``count`` last when synchronized (statistics per channel, keepdims), and applies
    ``update`` (a local step's moving statistics, or None) to its buffers; only ``y`` is
    differentiable: the statistics' dependence on x is already inside the closed-form dx. The channels
    are at ``channel_dim`` (1 for torch's NC..., the last dim for Keras' channels_last), so no layout
    is copied. ``setup_context`` and ``generate_vmap_rule`` make it usable under ``torch.func`` (grad,
    jacrev, vmap, jvp). With an ``all_reduce_sum`` every sum is global, and second derivatives are
    refused (the backward's all-reduce is not differentiated).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        all_reduce_sum: Any,
        channel_dim: int,
        update: _Update | None,
    ):
        return _training_forward(x, weight, bias, eps, all_reduce_sum, channel_dim, update)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps, all_reduce_sum, channel_dim, _update = inputs
        mean, inv_sigma, scale = output[1], output[3], output[4]
        count = output[5] if all_reduce_sum is not None else None
        ctx.eps, ctx.all_reduce_sum, ctx.channel_dim = eps, all_reduce_sum, channel_dim
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors for them
        ctx.bias_dtype = None if bias is None else bias.dtype
        # x (an input) rather than a normalized copy: saved inputs keep their graph, so the
        # backward below is itself differentiable and double backward is exact.
        ctx.save_for_backward(x, weight, mean, inv_sigma, scale, count)
        ctx.save_for_forward(x, weight)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, dy: Tensor, *_statistics_grads: Tensor):
        if dy is None:  # y unused (grads are not materialized)
            return None, None, None, None, None, None, None
        x, weight, mean, inv_sigma, scale, count = ctx.saved_tensors
        channel_dim = ctx.channel_dim
        xp = _namespace_for(dy, x, weight)
        if torch.is_grad_enabled():  # create_graph=True: the statistics as differentiable functions of x
            if ctx.all_reduce_sum is not None:
                raise RuntimeError("second derivatives through a synchronized BN (all_reduce_sum) are not supported")
            stats = _statistics(x, channel_dim=channel_dim)
            mean, count = stats.mean, stats.count
            _, _, inv_sigma = spec.inference_affine(
                stats.mean, stats.var, eps=ctx.eps, xp=_TORCH, return_inv_sigma=True
            )
            # differentiable in weight too (the saved scale is a non-differentiable output)
            scale = inv_sigma if weight is None else _keepdims(weight, x, channel_dim) * inv_sigma
        elif ctx.all_reduce_sum is None and xp is _TORCH_PLAIN and _replay.allowed(x):

            def recorded(dy: Tensor, x: Tensor, mean: Tensor, inv_sigma: Tensor, scale: Tensor):
                dims = _reduction_dims(x, channel_dim)
                count = xp.values_per_channel(x, dims)
                return _spec_backward(dy, x, mean, inv_sigma, scale, dims, count, None, _replay.RECORDING)

            key = ("backward", channel_dim, _layout(x), _layout(dy))
            replay = _REPLAYS(key, recorded, [dy, x, mean, inv_sigma, scale])
            if replay is not None:
                return _gradients(ctx, weight, *replay(dy, x, mean, inv_sigma, scale))
        dims = _reduction_dims(x, channel_dim)
        if count is None:  # local: the count is x's shape, a Python number (no tensor op)
            count = xp.values_per_channel(x, dims)
        dx, dgamma, dbeta = _spec_backward(dy, x, mean, inv_sigma, scale, dims, count, ctx.all_reduce_sum, xp)
        return _gradients(ctx, weight, dx, dgamma, dbeta)


def _spec_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_sigma: Tensor,
    scale: Tensor,
    dims: list[int],
    count: Any,
    all_reduce_sum: Any,
    xp: spec.arrays.Namespace,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta)`` by ``spec.backward_coefficient_form``, dgamma and dbeta of shape [C] (views: a
    replay records them, so no ATen call from Python is left for them)."""
    dx, dgamma, dbeta = spec.backward_coefficient_form(
        dy,
        xp.subtract(x, mean),
        inv_sigma,
        scale,
        dims,
        count=count,
        all_reduce_sum=_spec_all_reduce_sum(all_reduce_sum),
        xp=xp,
        overwrite_centered=True,  # x - mean is ours; torch reuses it for dx unless autograd records
        x=x,
        mean=mean,
    )
    return dx, dgamma.view(-1), dbeta.view(-1)


def _gradients(ctx, weight: Tensor | None, dx: Tensor, dgamma: Tensor, dbeta: Tensor) -> tuple:
    """``_BatchNormTrain.backward``'s return: the gradients its inputs need, parameters' in their own dtypes."""
    dweight = _as(dgamma, weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    dbias = _as(dbeta, ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return dx if ctx.needs_input_grad[0] else None, dweight, dbias, None, None, None, None


class _BatchNormTrainWithJvp(_BatchNormTrain):
    """``_BatchNormTrain`` plus forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``), local only.

    Separate because TorchDynamo refuses a Function with a custom ``jvp`` (torch 2.13,
    "Unsupported custom jvp"): ``torch.compile`` gets ``_BatchNormTrain``, eager code this one.
    The tangent is ``spec.batch_norm_tangent`` (the transpose of the closed-form backward).
    """

    @classmethod
    def apply_eagerly(
        cls, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channel_dim: int, update: _Update | None
    ) -> tuple[Tensor, ...]:
        """``apply`` of a local step outside ``torch.func`` transforms (the caller has checked), straight into the
        C++ apply that ``Function.apply`` ends in.

        Why: ``Function.apply`` binds the arguments to forward's signature with ``inspect.signature`` on every call
        (torch 2.13 torch/autograd/function.py, ``bind_default_args``), as long as a BN1d's whole forward, and its
        unwrapping of dead ``torch.func`` wrappers (``torch._functorch.utils.unwrap_dead_wrappers``) is a generator
        over every argument; here the same unwrapping of the three tensor arguments (the buffers in ``update`` are
        the module's own, which no transform wraps).
        """
        unwrap = torch._C._functorch.unwrap_if_dead
        x, weight, bias = unwrap(x), None if weight is None else unwrap(weight), None if bias is None else unwrap(bias)
        return super(torch.autograd.Function, cls).apply(x, weight, bias, eps, None, channel_dim, update)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_):
        x, weight = ctx.saved_tensors
        channel_dim = ctx.channel_dim
        dims = _reduction_dims(x, channel_dim)
        stats = _statistics(x, channel_dim=channel_dim)
        _, _, inv_sigma = spec.inference_affine(stats.mean, stats.var, eps=ctx.eps, xp=_TORCH, return_inv_sigma=True)
        x_hat = spec.normalize(x - stats.mean, inv_sigma)
        dy = spec.batch_norm_tangent(
            dx,
            x_hat,
            inv_sigma,
            dims,
            count=stats.count,
            gamma=_keepdims(weight, x, channel_dim),
            dgamma=_keepdims(dweight, x, channel_dim),
            dbeta=_keepdims(dbias, x, channel_dim),
            xp=_TORCH,
        )
        dy = torch.zeros_like(x_hat) if dy is None else dy
        return dy, None, None, None, None  # the statistics (and scale) are non-differentiable outputs


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32


# torch.jit.ignore: TorchScript cannot compile spec's namespace-generic functions; scripted code
# calls these back in Python (the module runs, but torch.jit.save cannot export it).
@torch.jit.ignore
def _train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    all_reduce_sum: Any,
    channel_dim: int = 1,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = None,
    convention: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(y, mean, var, count)``: y in x's dtype, per-channel statistics in the compute dtype as the Function gives
    them (keepdims: callers that hand them out flatten them), count a 0-d tensor when synchronized and None when
    local (x's shape says it).

    Given the running buffers (local steps only), it also updates them (:func:`update_running_stats_`; an
    empty batch leaves them): in an eager step inside the Function, with torch ops its replay records."""
    xc = _as(x, _compute_dtype(x))
    update = None
    if running_mean is not None and running_var is not None:
        assert all_reduce_sum is None, "a synchronized step's count is known after it; its caller updates"
        count = x.numel() // x.shape[channel_dim] if x.shape[channel_dim] else 0
        if count > 1:  # an empty batch leaves the statistics (torch.nn: ATen returns before updating)
            update = _Update(running_mean, running_var, num_batches_tracked, count, momentum, convention)
    if torch.compiler.is_compiling() or all_reduce_sum is not None:
        outputs = _BatchNormTrain.apply(xc, weight, bias, eps, all_reduce_sum, channel_dim, None)
    elif torch._C._are_functorch_transforms_active() or torch._C._is_tracing():
        # after the Function: torch.func transforms it, and a user's tracer cannot record its buffer writes
        outputs = _BatchNormTrainWithJvp.apply(xc, weight, bias, eps, None, channel_dim, None)
    else:
        outputs = _BatchNormTrainWithJvp.apply_eagerly(xc, weight, bias, eps, channel_dim, update)
        update = None  # applied inside
    count = None if all_reduce_sum is None else outputs[5].view(-1)[0]
    if update is not None:
        update.apply(outputs[1], outputs[2])
    return _as(outputs[0], x.dtype), outputs[1], outputs[2], count


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, channel_dim: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: ``(y, batch_mean, biased_batch_var)``, differentiable in y (and weight, bias).

    The channels are at ``channel_dim`` (1: torch's N, C, ...; -1: channels_last, as Keras lays out
    its tensors), read in place whatever the layout. The statistics have shape [C], in x's dtype
    (float32 for float16/bfloat16 input). The function both the ``BatchNorm*d`` modules and
    ``keras_bn``'s torch backend train with; the moving statistics are the caller's.
    """
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"channel_dim {channel_dim} is out of range for {x.dim()}D input {list(x.shape)}")
    y, mean, var, _ = _train(x, weight, bias, float(eps), None, channel_dim % x.dim(), None, None, None, None, "torch")
    return y, mean.view(-1), var.view(-1)


@torch.jit.ignore
def batch_norm_infer(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float = 1e-5
) -> Tensor:
    """Inference-mode forward with stored statistics: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` (§3)."""
    xc = _as(x, _compute_dtype(x))
    scale, _ = spec.inference_affine(
        _keepdims(mean, xc), _keepdims(var, xc), _keepdims(weight, xc), None, eps=eps, xp=_TORCH
    )
    y = spec.normalize(xc - _keepdims(mean, xc), scale, _keepdims(bias, xc), xp=_TORCH, overwrite_centered=True)
    return _as(y, x.dtype)


@torch.jit.ignore
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

    The weight (``spec.new_value_weight``), the variance fed in (``spec.variance_for_update``,
    Bessel's ``count / (count - 1)`` where the convention is unbiased) and the average
    (``spec.moving_average``) are spec's, on torch tensors. ``momentum`` has PyTorch's meaning in
    every convention (converted by ``spec.convert_momentum``). The caller has already incremented
    ``num_batches_tracked`` (as torch.nn does, even for an empty batch); ``count`` must be > 1.
    """
    _Update(running_mean, running_var, num_batches_tracked, count, momentum, convention).apply(batch_mean, batch_var)


def _update_statistics(update: _Update, batch_mean: Tensor, batch_var: Tensor, host: bool) -> None:
    """:func:`update_running_stats_`'s spec calls: NumPy on the buffers' host memory (``host``), else torch ops."""
    running_mean, running_var, num_batches_tracked = update.running_mean, update.running_var, update.num_batches_tracked
    conv, converted, counter = _update_rule(update.momentum, update.convention)
    # the batch's statistics as shape [C] like the buffers (the training forward gives them keepdims)
    statistics = (running_mean, running_var, batch_mean.view(-1), batch_var.view(-1))
    # On plain CPU tensors, spec's NumPy reference itself on the buffers' host memory: the same float64 operations
    # as torch's (IEEE, rounded to the buffers' dtype once by copy_), at ~0.5 us per operation on C values instead
    # of ATen's ~2-3 us dispatch. Else torch ops, which a graph capture (or torch_ref._replay) records.
    xp = np if host else _TORCH
    # NumPy records nothing; torch ops on the buffers must not (the batch statistics are non-differentiable outputs)
    with contextlib.nullcontext() if host else torch.no_grad():
        old_mean, old_var, mean64, var64 = [_float64(t, host) for t in statistics]
        batches_before = None
        if counter:
            assert num_batches_tracked is not None, f"convention {update.convention!r} needs num_batches_tracked"
            # the caller counted this batch; off the host a tensor, so a captured graph reads the counter each run
            batches_before = int(num_batches_tracked) - 1 if host else num_batches_tracked.to(torch.float64) - 1.0
        weight = spec.new_value_weight(conv, converted, batches_before, xp=xp)
        var_in = spec.variance_for_update(conv, var64, float(update.count), xp=xp)
        for buffer, old, new in ((running_mean, old_mean, mean64), (running_var, old_var, var_in)):
            average = spec.moving_average(old, new, weight)
            if host and buffer.dtype in _HOST_WRITE_DTYPES:  # rounded once to the buffer's dtype, as copy_ rounds
                np.copyto(buffer.numpy(), average, casting="same_kind")
            else:
                buffer.copy_(torch.from_numpy(average) if host else average)


#: buffers NumPy writes in place with torch's rounding (float64 -> float32 is IEEE round-to-nearest in both; torch
#: rounds float64 -> float16 through float32, NumPy directly, so half buffers keep copy_)
_HOST_WRITE_DTYPES = (torch.float32, torch.float64)


def _float64(t: Tensor, host: bool):
    """``t`` in float64: a NumPy copy of its host memory, or a torch tensor."""
    return t.numpy().astype(np.float64) if host else t.to(torch.float64)


#: dtypes NumPy holds as they are (it has no bfloat16)
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _host_arrays(tensors: tuple[Tensor, ...]) -> bool:
    """Whether every tensor can be read as a NumPy array in place: plain CPU tensors of a NumPy dtype, needing no
    gradient, outside ``torch.compile``, ``torch.jit.trace`` and ``torch.func`` transforms (fake, meta and wrapped
    tensors have no host memory; a tracer would bake the NumPy result in as a constant)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False  # a graph being captured must record the update as torch ops
    for t in tensors:  # a loop, not all(generator): this runs on every training step
        if (
            type(t) is not torch.Tensor
            or not t.is_cpu  # a property: t.device builds a device object (~1 us)
            or t.dtype not in _NUMPY_DTYPES
            or t.requires_grad
            or torch._C._functorch.is_functorch_wrapped_tensor(t)
        ):
            return False
    return True


@functools.lru_cache(maxsize=64)
def _update_rule(momentum: float | None, convention: str) -> tuple[spec.Convention, float | None, bool]:
    """``(convention record, momentum in that convention, whether the weight needs the batch counter)``.

    Cached: they depend only on the module's configuration, and converting and checking them is Python work on
    every step. Invalid values raise every time (``lru_cache`` does not cache exceptions).
    """
    conv = spec.get_convention(convention)
    converted = None if momentum is None else spec.convert_momentum(momentum, "torch", convention)
    return conv, converted, spec.needs_counter(conv, converted)


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
    if update and all_reduce_sum is None:  # local: _train updates the buffers too
        assert running_mean is not None and running_var is not None
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # first, as torch.nn counts (an empty batch too)
        return _train(
            x, weight, bias, eps, None, 1, running_mean, running_var, num_batches_tracked, momentum, convention
        )[0]
    # (TorchScript, for scripted modules: every argument of an ignored function given)
    y, mean, var, count_tensor = _train(x, weight, bias, eps, all_reduce_sum, 1, None, None, None, None, "torch")
    count = x.numel() // num_features
    if count_tensor is not None:  # synchronized: the values of every rank
        count = int(count_tensor.item())
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
    # momentum in PyTorch's meaning, as the convention's own (the convention name is checked first)
    spec.check_hyperparameters(
        convention, None if momentum is None else spec.convert_momentum(momentum, "torch", convention)
    )
    for label, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{label} must be a bool, got {value!r}")


def batch_norm_options(module: _TorchBatchNorm) -> dict[str, Any]:
    """The constructor arguments any ``torch.nn``/``torch_ref`` BatchNorm*d shares, read from ``module``.

    For code that swaps one BN class for another (``SyncBatchNorm.convert_sync_batchnorm``, the ONNX export's
    ``torch.nn`` twin) without forgetting one of them.
    """
    return {
        "num_features": module.num_features,
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
    }


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
