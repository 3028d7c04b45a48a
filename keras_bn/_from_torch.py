"""``keras_bn.from_torch``: a Keras model that computes what a PyTorch module computes, BN included.

The module is traced with ``torch.fx.symbolic_trace`` and every node becomes a Keras layer with
the module's weights. Every ``torch.nn.BatchNorm1d/2d/3d`` (or torch_ref BN) becomes
``keras_bn.BatchNorm(convention="torch", momentum=..., epsilon=...)`` filled by
``torch_ref.batch_norm_torch_to_keras`` (``momentum=None`` as ``"cumulative"``), so ``model.fit``
updates the statistics as PyTorch does (Bessel-corrected running variance, weight on the new value).

Layout: ``input_shape`` is PyTorch's per-sample shape, e.g. ``(3, 64, 64)``; the Keras model takes
channels-last input ``(64, 64, 3)`` (``channels_last=False``: the Keras model takes NCHW and
transposes it first). Rank-4 tensors are NHWC inside; ``flatten`` of one transposes it back to
(c, h, w) order first, so Linear weights are copied as they are. Convolution weights: OIHW -> HWIO
(depthwise: (C*mult, 1, kh, kw) -> (kh, kw, C, mult)); PyTorch's symmetric padding becomes a
``ZeroPadding2D`` before a 'valid' convolution, and a ``MaxPadding2D`` (-inf) before max-pooling.
An unsupported node raises ``ValueError`` naming it and its type (the module is never changed).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F
from keras import layers as L
from torch import fx, nn

from keras_bn.layer import CUMULATIVE, BatchNorm

__all__ = ["from_torch"]

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Hardsigmoid: "hard_sigmoid",
    nn.Hardswish: "hard_silu",
}
_FUNCTION_ACTIVATIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.silu: "silu",
    F.hardsigmoid: "hard_sigmoid",
    F.hardswish: "hard_silu",
}
_ADD, _MUL = (operator.add, torch.add), (operator.mul, torch.mul)


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
    return ValueError(f"torch node {node.name!r} ({what}) cannot be converted: {why}")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class _Converter:
    """Builds the Keras graph node by node; weights are assigned after the model is built."""

    def __init__(self, module: nn.Module, dtype: str) -> None:
        self.graph_module = fx.symbolic_trace(module)
        self.dtype = dtype
        self.values: dict[fx.Node, Any] = {}
        self.assignments: list[tuple[keras.Layer, Any]] = []

    # --- helpers on Keras tensors (rank-4 ones are NHWC) ---
    def _axis(self, x: Any, torch_dim: int) -> int:
        rank = len(x.shape)
        torch_dim %= rank
        return (0, 3, 1, 2)[torch_dim] if rank == 4 else torch_dim

    def _pad(self, x: Any, padding: tuple[int, int]) -> Any:
        return L.ZeroPadding2D(padding, dtype=self.dtype)(x) if any(padding) else x

    def _flatten(self, x: Any) -> Any:
        if len(x.shape) == 4:
            x = L.Permute((3, 1, 2), dtype=self.dtype)(x)  # NHWC -> (c, h, w): PyTorch's flatten order
        return L.Flatten(dtype=self.dtype)(x)

    # --- modules ---
    def _conv(self, node: fx.Node, conv: nn.Conv2d, x: Any) -> Any:
        if conv.padding_mode != "zeros":
            raise _unsupported(node, type(conv).__name__, f"padding_mode={conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
                raise _unsupported(node, "Conv2d", "padding='same' with an even kernel")
            padding = (
                (0, 0)
                if conv.padding == "valid"
                else tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
            )
        else:
            padding = _pair(conv.padding)
        x = self._pad(x, padding)
        weight = _np(conv.weight)  # (out, in / groups, kh, kw)
        out_channels, per_group, kh, kw = weight.shape
        common = dict(
            strides=conv.stride, dilation_rate=conv.dilation, use_bias=conv.bias is not None, dtype=self.dtype
        )
        if conv.groups > 1 and per_group == 1 and out_channels % conv.groups == 0:
            mult = out_channels // conv.groups
            layer = L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, **common)
            kernel = weight.reshape(conv.groups, mult, kh, kw).transpose(2, 3, 0, 1)  # channel c*mult + m
        else:
            layer = L.Conv2D(out_channels, (kh, kw), groups=conv.groups, **common)
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        y = layer(x)
        self.assignments.append((layer, [kernel] + ([_np(conv.bias)] if conv.bias is not None else [])))
        return y

    def _batch_norm(self, node: fx.Node, bn: nn.Module, x: Any) -> Any:
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

    def _linear(self, linear: nn.Linear, x: Any) -> Any:
        layer = L.Dense(linear.out_features, use_bias=linear.bias is not None, dtype=self.dtype)
        y = layer(x)
        self.assignments.append(
            (layer, [_np(linear.weight).T] + ([_np(linear.bias)] if linear.bias is not None else []))
        )
        return y

    def call_module(self, node: fx.Node, module: nn.Module, args: list[Any]) -> Any:
        x, kind = args[0], type(module)
        if isinstance(module, nn.Conv2d):
            return self._conv(node, module, x)
        if isinstance(module, _TORCH_BN) or (
            hasattr(module, "running_mean") and hasattr(module, "num_batches_tracked")
        ):
            return self._batch_norm(node, module, x)
        if isinstance(module, nn.Linear):
            return self._linear(module, x)
        if kind in _ACTIVATIONS:
            return L.Activation(_ACTIVATIONS[kind], dtype=self.dtype)(x)
        if isinstance(module, nn.GELU) and module.approximate == "none":
            return L.Activation("gelu", dtype=self.dtype)(x)
        if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            return self._pool(node, module, x)
        if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
            return L.GlobalAveragePooling2D(keepdims=True, dtype=self.dtype)(x)
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return self._flatten(x)
        if isinstance(module, nn.ZeroPad2d):
            left, right, top, bottom = module.padding
            return L.ZeroPadding2D(((top, bottom), (left, right)), dtype=self.dtype)(x)
        if isinstance(module, nn.Dropout):
            return L.Dropout(module.p, dtype=self.dtype)(x)
        if isinstance(module, nn.Identity):
            return x
        raise _unsupported(node, kind.__name__, "this module type is not supported by keras_bn.from_torch")

    def _pool(self, node: fx.Node, pool: nn.Module, x: Any) -> Any:
        kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        padding = _pair(pool.padding)
        if pool.ceil_mode:
            raise _unsupported(node, type(pool).__name__, "ceil_mode=True")
        if isinstance(pool, nn.MaxPool2d):
            if _pair(pool.dilation) != (1, 1):
                raise _unsupported(node, "MaxPool2d", "dilation (Keras' max-pooling has none)")
            if any(padding):
                x = MaxPadding2D(padding, dtype=self.dtype)(x)
            return L.MaxPooling2D(kernel, stride, dtype=self.dtype)(x)
        if any(padding) and not pool.count_include_pad:
            raise _unsupported(node, "AvgPool2d", "padding with count_include_pad=False")
        return L.AveragePooling2D(kernel, stride, dtype=self.dtype)(self._pad(x, padding))

    def call_function(self, node: fx.Node, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if not (k == "inplace" and v is False)}  # fx records F.relu's default
        if fn in _ADD and len(args) == 2 and not kwargs:
            return L.Add(dtype=self.dtype)(args)
        if fn in _MUL and len(args) == 2 and not kwargs:
            return L.Multiply(dtype=self.dtype)(args)
        if fn is torch.cat:
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            return L.Concatenate(axis=self._axis(tensors[0], dim), dtype=self.dtype)(list(tensors))
        if fn is torch.flatten and tuple(args[1:]) in ((1,), (1, -1)) and not kwargs:
            return self._flatten(args[0])
        if fn in _FUNCTION_ACTIVATIONS and len(args) == 1 and not kwargs:
            return L.Activation(_FUNCTION_ACTIVATIONS[fn], dtype=self.dtype)(args[0])
        constant = kwargs.get("mode", "constant") == "constant" and not kwargs.get("value")
        if fn is F.pad and len(args) == 2 and len(args[1]) == 4 and constant:
            left, right, top, bottom = args[1]
            return L.ZeroPadding2D(((top, bottom), (left, right)), dtype=self.dtype)(args[0])
        if fn is F.adaptive_avg_pool2d and _pair(args[1]) == (1, 1):
            return L.GlobalAveragePooling2D(keepdims=True, dtype=self.dtype)(args[0])
        name = getattr(fn, "__name__", repr(fn))
        raise _unsupported(node, name, "this function (with these arguments) is not supported by keras_bn.from_torch")

    def call_method(self, node: fx.Node, method: str, args: list[Any]) -> Any:
        if method == "flatten" and tuple(args[1:]) in ((1,), (1, -1)):
            return self._flatten(args[0])
        if method == "relu" and len(args) == 1:
            return L.Activation("relu", dtype=self.dtype)(args[0])
        raise _unsupported(node, f"Tensor.{method}", "this method is not supported by keras_bn.from_torch")

    def run(self, keras_input: Any) -> Any:
        output = None
        for node in self.graph_module.graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: self.values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n])
            if node.op == "placeholder":
                if self.values:
                    raise _unsupported(node, "input", "only modules with one tensor input are supported")
                self.values[node] = keras_input
            elif node.op == "call_module":
                self.values[node] = self.call_module(node, self.graph_module.get_submodule(node.target), list(args))
            elif node.op == "call_function":
                self.values[node] = self.call_function(node, node.target, list(args), dict(kwargs))
            elif node.op == "call_method":
                self.values[node] = self.call_method(node, node.target, list(args))
            elif node.op == "output":
                output = args[0]
            else:
                raise _unsupported(node, node.op, "parameters used directly in forward are not supported")
        return output


def _assign(layer: keras.Layer, source: Any) -> None:
    from torch_ref.transfer import batch_norm_torch_to_keras

    if isinstance(source, nn.Module):
        batch_norm_torch_to_keras(source, layer)
    else:
        layer.set_weights(source)


def from_torch(
    module: nn.Module, input_shape: Sequence[int], *, channels_last: bool = True, dtype: str | None = None
) -> keras.Model:
    """A ``keras.Model`` computing ``module``'s function with its weights (module docstring).

    ``input_shape`` is PyTorch's per-sample shape (e.g. ``(3, 64, 64)``). ``dtype``: the Keras layers'
    dtype; by default the module's parameter dtype (float32 without parameters). Raises
    ``ValueError`` naming the first node that cannot be converted.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    input_shape = tuple(int(d) for d in input_shape)
    if dtype is None:
        first = next(iter(module.parameters()), None)
        dtype = "float32" if first is None else str(first.dtype).removeprefix("torch.")
    converter = _Converter(module, dtype)
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
