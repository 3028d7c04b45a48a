"""``keras_bn.from_torch``: a Keras model that computes what a PyTorch module computes, BN included.

The module is traced (``tracer="export"``: ``torch.export.export``, ATen ops; ``tracer="fx"``:
``torch.fx.symbolic_trace``, modules and functions) and every node becomes a Keras layer with the
module's weights. One handler per operation: a module (``nn.Conv2d``), its functional form
(``F.conv2d``, e.g. EfficientNet's ``Conv2dStaticSamePadding.forward``) and its ATen op
(``aten.conv2d``) all reach the same handler. Every ``torch.nn.BatchNorm1d/2d/3d`` (or torch_ref
BN; under ``torch.export`` found through the node's ``nn_module_stack``) becomes
``keras_bn.BatchNorm(convention="torch", momentum=..., epsilon=...)`` filled by
``torch_ref.batch_norm_torch_to_keras`` (``momentum=None`` as ``"cumulative"``), so ``model.fit``
updates the statistics as PyTorch does (Bessel-corrected running variance, weight on the new value).

Tracing happens in eval mode (training flags are restored afterwards): Python branches on
``self.training`` take their inference branch (EfficientNet's drop connect is left out), while
Dropout and BN follow Keras' ``training`` flag in the converted model.

Layout: ``input_shape`` is PyTorch's per-sample shape, e.g. ``(3, 64, 64)``; the Keras model takes
channels-last input ``(64, 64, 3)`` (``channels_last=False``: the Keras model takes NCHW and
transposes it first). Rank-4 tensors are NHWC inside; ``flatten`` of one transposes it back to
(c, h, w) order first, so Linear weights are copied as they are. Convolution weights: OIHW -> HWIO
(depthwise: (C*mult, 1, kh, kw) -> (kh, kw, C, mult)); PyTorch's symmetric padding becomes a
``ZeroPadding2D`` before a 'valid' convolution, and a ``MaxPadding2D`` (-inf) before max-pooling.
An unsupported operation raises ``ValueError`` naming the node and its type before any Keras layer
is made, an unsupported option of a supported one before the Keras model is built (the module is
never changed).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F
from keras import layers as L
from torch import fx, nn

from keras_bn.layer import CUMULATIVE, BatchNorm

__all__ = ["TRACERS", "from_torch"]

TRACERS = ("export", "fx")
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_aten = torch.ops.aten


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_BN) or (hasattr(module, "running_mean") and hasattr(module, "num_batches_tracked"))


@keras.saving.register_keras_serializable(package="keras_bn")
class MaxPadding2D(keras.layers.Layer):
    """Pads NHWC height/width with -inf: PyTorch's MaxPool2d padding (Keras pads max-pooling only as 'same')."""

    def __init__(self, padding: tuple[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.padding = tuple(int(p) for p in padding)

    def call(self, x):
        (ph, pw) = self.padding
        return keras.ops.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=-np.inf)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        (ph, pw) = self.padding
        return (n, None if h is None else h + 2 * ph, None if w is None else w + 2 * pw, c)

    def get_config(self) -> dict:
        return {**super().get_config(), "padding": self.padding}


def _np(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def _unsupported(node: fx.Node, what: Any, why: str) -> ValueError:
    """Names the node, its operation and (torch.export inlines modules) the module it came from."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:  # (path, class) under fx, (path, qualified class name) under torch.export
        path, kind = stack[-1]
        origin = f" in module {path!r} ({getattr(kind, '__name__', str(kind).rsplit('.', 1)[-1])})"
    else:
        origin = ""
    return ValueError(f"torch node {node.name!r} ({what}{origin}) cannot be converted: {why}")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]),) * 2 if len(value) == 1 else (int(value[0]), int(value[1]))


class _Converter:
    """Builds the Keras graph node by node; weights are assigned after the model is built.

    Handlers take PyTorch's argument names and defaults (those of ``torch.nn.functional``, which the
    ATen schemas share), with Keras tensors in place of activations and torch tensors for weights.
    """

    def __init__(self, module: nn.Module, graph_module: fx.GraphModule, dtype: str) -> None:
        self.module, self.graph_module, self.dtype = module, graph_module, dtype
        self.values: dict[fx.Node, Any] = {}
        self.assignments: list[tuple[keras.Layer, Any]] = []

    # --- helpers on Keras tensors (rank-4 ones are NHWC) ---
    def _axis(self, x: Any, torch_dim: int) -> int:
        rank = len(x.shape)
        torch_dim %= rank
        return (0, 3, 1, 2)[torch_dim] if rank == 4 else torch_dim

    def _pad(self, x: Any, padding: tuple[int, int]) -> Any:
        return L.ZeroPadding2D(padding, dtype=self.dtype)(x) if any(padding) else x

    def activation(self, name: str) -> Callable[..., Any]:
        return lambda node, x, *_, **__: L.Activation(name, dtype=self.dtype)(x)

    # --- one handler per operation ---
    def conv2d(self, node, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
        kernel_size, dilation = weight.shape[2:], _pair(dilation)
        if isinstance(padding, str):
            if padding == "same" and any(k % 2 == 0 for k in kernel_size):
                raise _unsupported(node, "conv2d", "padding='same' with an even kernel")
            symmetric = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True))
            padding = (0, 0) if padding == "valid" else symmetric
        x = self._pad(input, _pair(padding))
        weight = _np(weight)  # (out, in / groups, kh, kw)
        out_channels, per_group, kh, kw = weight.shape
        common = dict(strides=_pair(stride), dilation_rate=dilation, use_bias=bias is not None, dtype=self.dtype)
        if groups > 1 and per_group == 1 and out_channels % groups == 0:
            mult = out_channels // groups
            layer = L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, **common)
            kernel = weight.reshape(groups, mult, kh, kw).transpose(2, 3, 0, 1)  # channel c*mult + m
        else:
            layer = L.Conv2D(out_channels, (kh, kw), groups=groups, **common)
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        y = layer(x)
        self.assignments.append((layer, [kernel] + ([_np(bias)] if bias is not None else [])))
        return y

    def linear(self, node, input, weight, bias=None):  # noqa: A002
        layer = L.Dense(weight.shape[0], use_bias=bias is not None, dtype=self.dtype)
        y = layer(input)
        self.assignments.append((layer, [_np(weight).T] + ([_np(bias)] if bias is not None else [])))
        return y

    def batch_norm(self, node, bn: nn.Module, x: Any) -> Any:
        if not bn.track_running_stats:
            raise _unsupported(node, type(bn).__name__, "track_running_stats=False")
        layer = BatchNorm(
            axis=-1 if len(x.shape) == 4 else 1,
            convention="torch",
            momentum=CUMULATIVE if bn.momentum is None else float(bn.momentum),
            epsilon=float(bn.eps),
            center=bn.affine,
            scale=bn.affine,
            dtype=self.dtype,
        )
        y = layer(x)
        self.assignments.append((layer, bn))
        return y

    def aten_batch_norm(self, node, input, *_, **__):  # noqa: A002
        """torch.export inlines BN modules into ``aten.batch_norm``; the module comes back from the node's stack."""
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else None
        bn = self.module.get_submodule(path) if path is not None else None
        if bn is None or not _is_batch_norm(bn):
            raise _unsupported(node, "batch_norm", "a functional batch_norm outside a BN module")
        return self.batch_norm(node, bn, input)

    def max_pool2d(self, node, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *rest):  # noqa: A002
        kernel, padding = _pair(kernel_size), _pair(padding)
        stride = _pair(stride) if stride else kernel  # F: None, ATen: [] mean "the kernel size"
        if ceil_mode or any(rest):
            raise _unsupported(node, "max_pool2d", "ceil_mode=True or return_indices=True")
        if _pair(dilation) != (1, 1):
            raise _unsupported(node, "max_pool2d", "dilation (Keras' max-pooling has none)")
        x = MaxPadding2D(padding, dtype=self.dtype)(input) if any(padding) else input
        return L.MaxPooling2D(kernel, stride, dtype=self.dtype)(x)

    def avg_pool2d(self, node, input, kernel_size, stride=None, padding=0, ceil_mode=False,  # noqa: A002
                   count_include_pad=True, divisor_override=None):  # fmt: skip
        kernel, padding = _pair(kernel_size), _pair(padding)
        stride = _pair(stride) if stride else kernel
        if ceil_mode or divisor_override is not None:
            raise _unsupported(node, "avg_pool2d", "ceil_mode=True or divisor_override")
        if any(padding) and not count_include_pad:
            raise _unsupported(node, "avg_pool2d", "padding with count_include_pad=False")
        return L.AveragePooling2D(kernel, stride, dtype=self.dtype)(self._pad(input, padding))

    def adaptive_avg_pool2d(self, node, input, output_size):  # noqa: A002
        if _pair(output_size) != (1, 1):
            raise _unsupported(node, "adaptive_avg_pool2d", f"output_size={output_size!r} (only 1x1)")
        return L.GlobalAveragePooling2D(keepdims=True, dtype=self.dtype)(input)

    def flatten(self, node, input, start_dim=1, end_dim=-1):  # noqa: A002
        if (start_dim, end_dim) != (1, -1):
            raise _unsupported(node, "flatten", f"start_dim={start_dim}, end_dim={end_dim} (only 1, -1)")
        x = input
        if len(x.shape) == 4:
            x = L.Permute((3, 1, 2), dtype=self.dtype)(x)  # NHWC -> (c, h, w): PyTorch's flatten order
        return L.Flatten(dtype=self.dtype)(x)

    def pad(self, node, input, pad, mode="constant", value=None):  # noqa: A002
        if len(pad) != 4 or mode != "constant" or value:
            raise _unsupported(node, "pad", f"pad={pad!r}, mode={mode!r}, value={value!r} (only 2-D zero padding)")
        left, right, top, bottom = pad
        return L.ZeroPadding2D(((top, bottom), (left, right)), dtype=self.dtype)(input)

    def constant_pad_nd(self, node, input, pad, value=0):  # noqa: A002
        return self.pad(node, input, pad, "constant", value)

    def _scalar(self, node, what: str, input, other):  # noqa: A002
        """(tensor, Python number) of a tensor-scalar operation, or None for two tensors; raises otherwise."""
        tensors = [keras.utils.is_keras_tensor(t) for t in (input, other)]
        if all(tensors):
            return None
        number = other if tensors[0] else input
        if not any(tensors) or not isinstance(number, int | float):
            raise _unsupported(node, what, "only two tensors, or a tensor and a Python number")
        return (input if tensors[0] else other), float(number)

    def add(self, node, input, other, *, alpha=1):  # noqa: A002
        if alpha != 1:
            raise _unsupported(node, "add", f"alpha={alpha}")
        scalar = self._scalar(node, "add", input, other)
        if scalar is not None:  # x + c as Keras' Rescaling: x * 1 + c, exact
            return L.Rescaling(1.0, offset=scalar[1], dtype=self.dtype)(scalar[0])
        return L.Add(dtype=self.dtype)([input, other])

    def sub(self, node, input, other, *, alpha=1):  # noqa: A002
        scalar = self._scalar(node, "sub", input, other)
        if scalar is None and alpha == 1:
            return L.Subtract(dtype=self.dtype)([input, other])
        if alpha != 1 or not keras.utils.is_keras_tensor(input):
            raise _unsupported(node, "sub", "only tensor - tensor or tensor - Python number")
        return L.Rescaling(1.0, offset=-scalar[1], dtype=self.dtype)(input)  # x - c == x + (-c) exactly

    def mul(self, node, input, other):  # noqa: A002
        scalar = self._scalar(node, "mul", input, other)
        if scalar is not None:  # x * c as Keras' Rescaling: x * c + 0, exact
            return L.Rescaling(scalar[1], dtype=self.dtype)(scalar[0])
        return L.Multiply(dtype=self.dtype)([input, other])

    def mean(self, node, input, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
        """Mean over (H, W) of an NCHW tensor: global average pooling (torchvision's ``x.mean((2, 3))``)."""
        dims = sorted(d % 4 for d in dim) if dim is not None and len(input.shape) == 4 else None
        if dims != [2, 3] or dtype is not None:
            raise _unsupported(node, "mean", f"dim={dim!r} (only the spatial dims of an NCHW tensor)")
        return L.GlobalAveragePooling2D(keepdims=bool(keepdim), dtype=self.dtype)(input)

    def softmax(self, node, input, dim=None, *rest, **__):  # noqa: A002  (F.softmax, aten._softmax(x, dim, half))
        if dim is None or (rest and rest[0] not in (None, False)):
            raise _unsupported(node, "softmax", "an explicit dim and no dtype")
        return L.Softmax(axis=self._axis(input, dim), dtype=self.dtype)(input)

    def reshape(self, node, input, *shape):  # noqa: A002
        """Only a flatten: ``x.view(n, -1)`` (torch.export records the traced batch size as ``n``)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], list | tuple) else shape
        features = int(np.prod(input.shape[1:]))
        if len(shape) != 2 or shape[1] not in (-1, features):
            raise _unsupported(node, "reshape", f"shape {shape!r} (only a flatten to (batch, -1))")
        return self.flatten(node, input)

    def cat(self, node, tensors, dim=0):
        return L.Concatenate(axis=self._axis(tensors[0], dim), dtype=self.dtype)(list(tensors))

    def dropout(self, node, input, p=0.5, training=False, inplace=False):  # noqa: A002
        return L.Dropout(float(p), dtype=self.dtype)(input)  # Keras' training flag decides, as PyTorch's mode does

    def relu6(self, node, input, min_val=0.0, max_val=6.0, inplace=False):  # noqa: A002  (hardtanh's arguments)
        if (min_val, max_val) != (0.0, 6.0):
            raise _unsupported(node, "hardtanh", f"min_val={min_val}, max_val={max_val} (only relu6)")
        return L.Activation("relu6", dtype=self.dtype)(input)

    def gelu(self, node, input, approximate="none"):  # noqa: A002
        if approximate != "none":
            raise _unsupported(node, "gelu", f"approximate={approximate!r}")
        return L.Activation("gelu", dtype=self.dtype)(input)

    def identity(self, node, input, *_, **__):  # noqa: A002
        return input

    # --- modules: their attributes become a handler's arguments ---
    def call_module(self, node: fx.Node, module: nn.Module, x: Any) -> Any:
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise _unsupported(node, type(module).__name__, f"padding_mode={module.padding_mode!r}")
            m = module
            return self.conv2d(node, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if _is_batch_norm(module):
            return self.batch_norm(node, module, x)
        if isinstance(module, nn.Linear):
            return self.linear(node, x, module.weight, module.bias)
        if type(module) in _ACTIVATION_MODULES:
            return self.activation(_ACTIVATION_MODULES[type(module)])(node, x)
        if isinstance(module, nn.GELU):
            return self.gelu(node, x, module.approximate)
        if isinstance(module, nn.MaxPool2d):
            m = module
            return self.max_pool2d(
                node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
            )
        if isinstance(module, nn.AvgPool2d):
            m = module
            args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
            return self.avg_pool2d(node, x, *args)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return self.adaptive_avg_pool2d(node, x, module.output_size)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        if isinstance(module, nn.ZeroPad2d):
            return self.pad(node, x, module.padding)
        if isinstance(module, nn.Dropout):
            return self.dropout(node, x, module.p)
        if isinstance(module, nn.Identity):
            return x
        if isinstance(module, nn.Softmax):
            return self.softmax(node, x, module.dim)
        raise _unsupported(node, type(module).__name__, "this module type is not supported by keras_bn.from_torch")

    def handler(self, node: fx.Node) -> Callable[..., Any] | None:
        """The handler of ``node`` (None for graph plumbing); raises naming an unsupported node."""
        if node.op in ("placeholder", "output", "get_attr"):
            return None
        if node.op == "call_module":
            if node.target == "_guards_fn":  # torch.export's input-shape assertion: no value
                return None
            module = self.graph_module.get_submodule(node.target)
            if not isinstance(module, _SUPPORTED_MODULES) and not _is_batch_norm(module):
                raise _unsupported(
                    node, type(module).__name__, "this module type is not supported by keras_bn.from_torch"
                )
            return lambda node, x, *_: self.call_module(node, module, x)
        if node.op == "call_method":
            if node.target not in _METHODS:
                raise _unsupported(node, f"Tensor.{node.target}", "this method is not supported by keras_bn.from_torch")
            return self._resolve(_METHODS[node.target])
        name = _FUNCTIONS.get(node.target)
        if name is None:
            what = getattr(node.target, "__name__", str(node.target))
            raise _unsupported(node, what, "this function is not supported by keras_bn.from_torch")
        return self._resolve(name)

    def _resolve(self, name: str) -> Callable[..., Any]:
        kind, _, activation = name.partition(":")
        return self.activation(activation) if kind == "activation" else getattr(self, name)

    def run(self, keras_input: Any) -> Any:
        handlers = {node: self.handler(node) for node in self.graph_module.graph.nodes}  # refuse before building
        output = None
        for node, handler in handlers.items():
            args = fx.node.map_arg(node.args, lambda n: self.values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n])
            kwargs = {k: v for k, v in kwargs.items() if k not in ("inplace", "memory_format")}
            if node.op == "placeholder":
                if any(n.op == "placeholder" for n in self.values):
                    raise _unsupported(node, "input", "only modules with one tensor input are supported")
                self.values[node] = keras_input
            elif node.op == "get_attr":
                self.values[node] = functools.reduce(getattr, node.target.split("."), self.graph_module)
            elif node.op == "output":
                output = args[0]
            elif handler is not None:
                self.values[node] = handler(node, *args, **kwargs)
        if isinstance(output, list | tuple) and len(output) == 1:  # torch.export returns a tuple of outputs
            output = output[0]
        return output


_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Hardsigmoid: "hard_sigmoid",
    nn.Hardswish: "hard_silu",  # Keras' hard_silu is x * relu6(x + 3) / 6, torch's Hardswish
}
_SUPPORTED_MODULES = (
    nn.Conv2d, nn.Linear, nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ZeroPad2d,
    nn.Dropout, nn.Identity, nn.Softmax, *_ACTIVATION_MODULES,
)  # fmt: skip


def _function_table() -> dict[Any, str]:
    """Each traced callable (torch function, ``F`` function, operator, ATen overload) -> its handler's name."""
    table: dict[Any, str] = {}
    aliases = {
        "conv2d": [F.conv2d, torch.conv2d, _aten.conv2d.default, _aten.conv2d.padding],
        "linear": [F.linear, _aten.linear.default],
        "aten_batch_norm": [_aten.batch_norm.default],
        "max_pool2d": [F.max_pool2d, _aten.max_pool2d.default],
        "avg_pool2d": [F.avg_pool2d, _aten.avg_pool2d.default],
        "adaptive_avg_pool2d": [F.adaptive_avg_pool2d, _aten.adaptive_avg_pool2d.default],
        "flatten": [torch.flatten, _aten.flatten.using_ints],
        "pad": [F.pad, _aten.pad.default],
        "constant_pad_nd": [_aten.constant_pad_nd.default],
        "add": [operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor, _aten.add.Scalar],
        "sub": [operator.sub, torch.sub, _aten.sub.Tensor, _aten.sub.Scalar],
        "mul": [operator.mul, operator.imul, torch.mul, _aten.mul.Tensor, _aten.mul_.Tensor, _aten.mul.Scalar],
        "mean": [torch.mean, _aten.mean.dim],
        "softmax": [F.softmax, torch.softmax, _aten.softmax.int, _aten._softmax.default],
        "reshape": [torch.reshape, _aten.view.default, _aten.reshape.default],
        "cat": [torch.cat, _aten.cat.default],
        "dropout": [F.dropout, _aten.dropout.default],
        "relu6": [F.relu6, _aten.hardtanh.default, _aten.hardtanh_.default],
        "gelu": [F.gelu, _aten.gelu.default],
        "identity": [_aten.clone.default, _aten.alias.default],
        "activation:relu": [F.relu, torch.relu, _aten.relu.default, _aten.relu_.default],
        "activation:sigmoid": [torch.sigmoid, F.sigmoid, _aten.sigmoid.default, _aten.sigmoid_.default],
        "activation:tanh": [torch.tanh, F.tanh, _aten.tanh.default, _aten.tanh_.default],
        "activation:silu": [F.silu, _aten.silu.default, _aten.silu_.default],
        "activation:hard_sigmoid": [F.hardsigmoid, _aten.hardsigmoid.default, _aten.hardsigmoid_.default],
        "activation:hard_silu": [F.hardswish, _aten.hardswish.default, _aten.hardswish_.default],
    }
    for name, callables in aliases.items():
        table.update(dict.fromkeys(callables, name))
    return table


_FUNCTIONS = _function_table()
# Tensor methods -> handler (``x.relu()`` as the activation).
_METHODS = {
    "flatten": "flatten",
    "relu": "activation:relu",
    "mean": "mean",
    "softmax": "softmax",
    "view": "reshape",
    "reshape": "reshape",
}


def _trace(module: nn.Module, input_shape: tuple[int, ...], dtype: str, tracer: str) -> fx.GraphModule:
    """``module``'s graph in eval mode; each submodule's training flag is restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        if tracer == "fx":
            return fx.symbolic_trace(module)
        example = torch.zeros((2, *input_shape), dtype=getattr(torch, dtype))  # 2: BN's batch statistics need 2
        try:
            return torch.export.export(module, (example,)).module()
        except Exception as err:  # export reports Python it cannot trace in many exception types
            raise ValueError(
                f"torch.export could not trace {type(module).__name__} ({type(err).__name__}: {err}); "
                "tracer='fx' may trace it"
            ) from err
    finally:
        for m, training in modes.items():
            m.training = training


def _assign(layer: keras.Layer, source: Any) -> None:
    from torch_ref.transfer import batch_norm_torch_to_keras

    if isinstance(source, nn.Module):
        batch_norm_torch_to_keras(source, layer)
    else:
        layer.set_weights(source)


def from_torch(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    channels_last: bool = True,
    dtype: str | None = None,
    tracer: str = "export",
) -> keras.Model:
    """A ``keras.Model`` computing ``module``'s function with its weights (module docstring).

    ``input_shape`` is PyTorch's per-sample shape (e.g. ``(3, 64, 64)``). ``dtype``: the Keras layers'
    dtype; by default the module's parameter dtype (float32 without parameters). ``tracer``:
    ``"export"`` (default: ``torch.export``, PyTorch's supported capture, which runs the module's
    Python, so shape arithmetic, helper functions and autograd Functions trace) or ``"fx"``
    (``torch.fx.symbolic_trace``: no example run, but Python that needs values fails). Raises
    ``ValueError`` naming the first node that cannot be converted.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    input_shape = tuple(int(d) for d in input_shape)
    if dtype is None:
        first = next(iter(module.parameters()), None)
        dtype = "float32" if first is None else str(first.dtype).removeprefix("torch.")
    converter = _Converter(module, _trace(module, input_shape, dtype, tracer), dtype)
    spatial = len(input_shape) == 3
    if spatial and channels_last:
        inputs = keras.Input(input_shape[1:] + input_shape[:1], dtype=dtype)
        x = inputs
    else:
        inputs = keras.Input(input_shape, dtype=dtype)
        x = L.Permute((2, 3, 1), dtype=dtype)(inputs) if spatial else inputs
    outputs = converter.run(x)
    model = keras.Model(inputs, outputs, name=type(module).__name__)
    for layer, source in converter.assignments:
        _assign(layer, source)
    return model
