"""``torch_ref.from_keras``: a PyTorch module that computes what a built Keras model computes, BN included.

(A private module: a public ``torch_ref/from_keras.py`` would shadow the function ``torch_ref.from_keras``
once imported, since importing a submodule binds its name on the package.)

The Keras graph (Functional or Sequential, nested models too) is walked in Keras' own
topological order (``Function._nodes_by_depth``) and every layer becomes a module of
``torch_ref._keras_ops`` holding the Keras weights:

- Conv2D / DepthwiseConv2D / SeparableConv2D: HWIO kernels to OIHW (depthwise channel ``c*mult + m``
  is group ``c``'s ``m``-th filter in both), strides, dilation, groups, and TensorFlow's 'same'
  padding, which puts an odd extra pixel at the bottom/right.
- Dense: kernel transposed. Flatten flattens in Keras' (h, w, c) order, so no permutation is needed.
- Every BN (``keras.layers.BatchNormalization`` or ``keras_bn.BatchNorm``) becomes a torch_ref BN
  filled by ``torch_ref.batch_norm_keras_to_torch``: the layer's epsilon, its momentum converted by
  ``spec.convert_momentum``, and the moving statistics updated by the layer's own convention
  (Keras': biased running variance), so training in PyTorch moves them as Keras does.

Layout: the returned module takes and returns channels-last tensors like the Keras model
(``channels_last=False``: NCHW in and out); inside, rank-4 tensors are NCHW. Training mode
follows PyTorch's ``module.train()``; a Keras BN with ``trainable=False`` stays in inference mode.
An unsupported layer raises ``ValueError`` naming it and its class before any module is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch
from torch import Tensor, nn

from torch_ref import _keras_ops as ops
from torch_ref.transfer import batch_norm_keras_to_torch

__all__ = ["KerasGraphModule", "from_keras"]

_MERGES = {
    keras.layers.Add: "add",
    keras.layers.Subtract: "subtract",
    keras.layers.Multiply: "multiply",
    keras.layers.Average: "average",
    keras.layers.Maximum: "maximum",
    keras.layers.Minimum: "minimum",
    keras.layers.Concatenate: "concatenate",
}


def _np(value: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(value), order="C")


def _tensor(value: Any) -> Tensor:
    return torch.from_numpy(_np(value))


def _param(value: Any, trainable: bool = True) -> nn.Parameter:
    return nn.Parameter(_tensor(value), requires_grad=trainable)


def _unsupported(layer: keras.Layer, why: str) -> ValueError:
    return ValueError(f"keras layer {layer.name!r} ({type(layer).__name__}) cannot be converted: {why}")


def _is_batch_norm(layer: keras.Layer) -> bool:
    return hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance")


def _input_rank(layer: keras.Layer) -> int:
    return len(layer.input.shape)


def _check_channels_last(layer: keras.Layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, f"data_format={layer.data_format!r} (only 'channels_last' is supported)")


def _activation(layer: keras.Layer) -> str:
    name = ops.activation_name(getattr(layer, "activation", None))
    if not ops.is_supported_activation(name):
        raise _unsupported(layer, f"activation {name!r} is not supported")
    return name


def _conv_module(layer: keras.Layer, kernel: np.ndarray, bias: Any, groups: int, strides, padding: str) -> ops.Conv2d:
    """An nn.Conv2d from an OIHW kernel, wrapped with TF padding and the activation."""
    out_channels, in_per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        (kh, kw),
        stride=tuple(strides),
        dilation=tuple(layer.dilation_rate),
        groups=groups,
        bias=bias is not None,
    )
    conv.weight = _param(kernel, layer.trainable)
    if bias is not None:
        conv.bias = _param(bias, layer.trainable)
    return ops.Conv2d(conv, padding, "linear")


def _convert_conv(layer: keras.Layer) -> nn.Module:
    _check_channels_last(layer)
    activation = _activation(layer)
    if isinstance(layer, keras.layers.SeparableConv2D):
        depthwise = _np(layer.depthwise_kernel)  # (kh, kw, in, mult)
        kh, kw, channels, mult = depthwise.shape
        dw = _conv_module(
            layer, depthwise.reshape(kh, kw, 1, channels * mult).transpose(3, 2, 0, 1), None, channels,
            layer.strides, layer.padding,
        )  # fmt: skip
        pointwise_kernel = _np(layer.pointwise_kernel).transpose(3, 2, 0, 1)
        pointwise = nn.Conv2d(channels * mult, pointwise_kernel.shape[0], 1, bias=layer.bias is not None)
        pointwise.weight = _param(pointwise_kernel, layer.trainable)
        if layer.bias is not None:
            pointwise.bias = _param(layer.bias, layer.trainable)
        return ops.SeparableConv2d(dw, pointwise, activation)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = _np(layer.kernel)  # (kh, kw, in, mult): output channel c*mult + m
        kh, kw, channels, mult = kernel.shape
        kernel, groups = kernel.reshape(kh, kw, 1, channels * mult).transpose(3, 2, 0, 1), channels
    else:
        kernel, groups = _np(layer.kernel).transpose(3, 2, 0, 1), layer.groups  # HWIO -> OIHW
    module = _conv_module(layer, kernel, layer.bias, groups, layer.strides, layer.padding)
    module.activation = ops.Activation(activation)
    return module


def _convert_dense(layer: keras.layers.Dense) -> nn.Module:
    activation = _activation(layer)
    kernel = _np(layer.kernel)
    linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.bias is not None)
    linear.weight = _param(kernel.T, layer.trainable)
    if layer.bias is not None:
        linear.bias = _param(layer.bias, layer.trainable)
    return ops.Dense(linear, activation)


def _check_batch_norm(layer: keras.Layer) -> int:
    """The input rank of a BN layer this converter can express exactly; raises otherwise."""
    for name, bad in (("renorm", True), ("normalize_with", "moving"), ("stats_update", "frozen")):
        if getattr(layer, name, None) == bad:
            raise _unsupported(layer, f"{name}={bad!r} has no PyTorch counterpart here")
    rank = _input_rank(layer)
    if rank not in ops.BATCH_NORM_BY_RANK or not isinstance(layer.axis, int):
        raise _unsupported(layer, f"BN over a rank-{rank} input with axis={layer.axis!r}")
    if layer.beta is not None and layer.gamma is None:
        raise _unsupported(layer, "scale=False with center=True (a torch BN has no bias without a weight)")
    return rank


def _convert_batch_norm(layer: keras.Layer) -> nn.Module:
    rank = _check_batch_norm(layer)
    has_gamma, has_beta = layer.gamma is not None, layer.beta is not None
    bn = ops.BATCH_NORM_BY_RANK[rank](
        int(layer.moving_mean.shape[0]), affine=has_gamma, bias=has_beta, dtype=_tensor(layer.moving_mean).dtype
    )
    bn.convention = getattr(layer, "convention", "keras")
    bn.channel_dim = ops.keras_axis_to_torch(layer.axis, rank)
    bn.frozen = not layer.trainable  # Keras runs a non-trainable BN in inference mode, also in fit()
    batch_norm_keras_to_torch(layer, bn)  # weights, statistics, eps, momentum converted to torch's
    if not (layer.trainable and getattr(layer, "affine_trainable", True)):
        for param in (bn.weight, bn.bias):
            if param is not None:
                param.requires_grad_(False)
    return bn


def _convert_pool(layer: keras.Layer) -> nn.Module:
    _check_channels_last(layer)
    kind = "max" if isinstance(layer, keras.layers.MaxPooling2D) else "average"
    return ops.Pool2d(kind, layer.pool_size, layer.strides, layer.padding)


def _convert_relu(layer: keras.layers.ReLU) -> nn.Module:
    max_value = None if layer.max_value is None else float(layer.max_value)
    slope = float(layer.negative_slope)
    # The slope as Keras' backend applies it in its leaky_relu branch (TensorFlow: via float32).
    minus_one = keras.ops.cast(-1.0, layer.compute_dtype)
    leaky_slope = -float(keras.ops.convert_to_numpy(keras.ops.leaky_relu(minus_one, slope))) if slope else 0.0
    return ops.ReLU(max_value, slope, float(layer.threshold), leaky_slope)


def _convert_rescaling(layer: keras.layers.Rescaling) -> nn.Module:
    # Cast by Keras itself: TensorFlow casts a Python float via float32 (1/255 is not 1/255 in float64).
    scale, offset = (_tensor(keras.ops.cast(v, layer.compute_dtype)) for v in (layer.scale, layer.offset))
    return ops.Rescaling(scale, offset)


def _convert_normalization(layer: keras.layers.Normalization) -> nn.Module:
    if layer.invert:
        raise _unsupported(layer, "invert=True")
    return ops.Normalization(_tensor(layer.mean), _tensor(layer.variance), float(keras.backend.epsilon()))


def _merge_kind(layer: keras.Layer) -> str:
    return next(kind for cls, kind in _MERGES.items() if isinstance(layer, cls))


def _convert_dropout(layer: keras.layers.Dropout) -> nn.Module:
    return ops.Dropout(float(layer.rate), layer.noise_shape)


# Layer class -> converter, most specific first (SeparableConv2D and DepthwiseConv2D are not Conv2D
# subclasses in Keras 3, but a user subclass of Conv2D is taken as a Conv2D).
_CONVERTERS: list[tuple[type | Callable[[keras.Layer], bool], Callable[[Any], nn.Module]]] = [
    (keras.layers.InputLayer, lambda layer: ops.Identity()),
    (_is_batch_norm, _convert_batch_norm),
    ((keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D, keras.layers.Conv2D), _convert_conv),
    (keras.layers.Dense, _convert_dense),
    (keras.layers.ReLU, _convert_relu),
    (keras.layers.Activation, lambda layer: ops.Activation(_activation(layer))),
    (keras.layers.Softmax, lambda layer: ops.Softmax(int(np.ravel(layer.axis)[0]))),
    (tuple(_MERGES), lambda layer: ops.Merge(_merge_kind(layer), getattr(layer, "axis", -1))),
    (keras.layers.ZeroPadding2D, lambda layer: (_check_channels_last(layer), ops.ZeroPad2d(layer.padding))[1]),
    ((keras.layers.MaxPooling2D, keras.layers.AveragePooling2D), _convert_pool),
    (
        (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D),
        lambda layer: (
            _check_channels_last(layer),
            ops.GlobalPool2d("max" if isinstance(layer, keras.layers.GlobalMaxPooling2D) else "avg", layer.keepdims),
        )[1],
    ),
    (keras.layers.Flatten, lambda layer: (_check_channels_last(layer), ops.Flatten())[1]),
    (keras.layers.Reshape, lambda layer: ops.Reshape(layer.target_shape)),
    (keras.layers.Dropout, _convert_dropout),
    (keras.layers.Identity, lambda layer: ops.Identity()),
    (keras.layers.Rescaling, _convert_rescaling),
    (keras.layers.Normalization, _convert_normalization),
]


def _converter(layer: keras.Layer) -> Callable[[Any], nn.Module]:
    for match, convert in _CONVERTERS:
        if isinstance(layer, match) if isinstance(match, type | tuple) else match(layer):
            return convert
    raise _unsupported(layer, "this layer type is not supported by torch_ref.from_keras")


class _Step:
    """One Keras node: the module to call, its input slots, whether it takes a list, its output slots."""

    def __init__(self, name: str, inputs: list[int], as_list: bool, outputs: list[int]) -> None:
        self.name, self.inputs, self.as_list, self.outputs = name, inputs, as_list, outputs


class _Graph(nn.Module):
    """The Keras graph in topological order; tensors in the converted layout (rank 4 as NCHW)."""

    def __init__(self, model: keras.Model, converted: dict[int, tuple[str, nn.Module]]) -> None:
        super().__init__()
        function = getattr(model, "_functional", None) or model  # a built Sequential wraps a Functional
        if not hasattr(function, "_nodes_by_depth"):
            raise ValueError(f"keras model {model.name!r} ({type(model).__name__}) is not built on a symbolic input")
        slots: dict[int, int] = {}

        def slot(tensor: Any) -> int:
            return slots.setdefault(id(tensor), len(slots))

        self.input_slots = [slot(x) for x in function.inputs]
        self.layers = nn.ModuleDict()
        self.steps: list[_Step] = []
        for depth in sorted(function._nodes_by_depth, reverse=True):
            for node in function._nodes_by_depth[depth]:
                if node.is_input or node.operation is None:
                    continue
                name, module = converted[id(node.operation)]
                self.layers[name] = module
                arguments = node.arguments.keras_tensors
                as_list = len(node.arguments.args) == 1 and isinstance(node.arguments.args[0], list | tuple)
                self.steps.append(_Step(name, [slot(x) for x in arguments], as_list, [slot(x) for x in node.outputs]))
        self.output_slots = [slot(x) for x in function.outputs]

    def forward(self, *inputs: Tensor) -> list[Tensor]:
        values = dict(zip(self.input_slots, inputs, strict=True))
        for step in self.steps:
            args = [values[i] for i in step.inputs]
            module = self.layers[step.name]
            if isinstance(module, _Graph):  # a nested model takes its inputs as arguments
                out = module(*args)
            else:
                out = module(args if step.as_list else args[0])
            for index, value in zip(step.outputs, out if isinstance(out, list | tuple) else [out], strict=True):
                values[index] = value
        return [values[i] for i in self.output_slots]


def _safe_name(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "layer"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def _operations(model: keras.Model) -> list[keras.Layer]:
    """Every operation of the graph (nested models as themselves), in Keras' order."""
    function = getattr(model, "_functional", None) or model
    return list(getattr(function, "operations", model.layers))


def _check_supported(model: keras.Model) -> None:
    """Refuse before building anything: the first unsupported layer, with its name and class."""
    for layer in _operations(model):
        if isinstance(layer, keras.Model):
            _check_supported(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            convert = _converter(layer)
            if convert in (_convert_conv, _convert_dense):
                _activation(layer)
            elif convert is _convert_batch_norm:
                _check_batch_norm(layer)


def _convert_model(model: keras.Model, taken: set[str]) -> _Graph:
    converted: dict[int, tuple[str, nn.Module]] = {}
    for layer in _operations(model):
        if id(layer) in converted:
            continue
        module = _convert_model(layer, set()) if isinstance(layer, keras.Model) else _converter(layer)(layer)
        converted[id(layer)] = (_safe_name(layer.name, taken), module)
    return _Graph(model, converted)


class KerasGraphModule(nn.Module):
    """A converted Keras model: ``forward(*inputs)`` takes the Keras model's inputs, returns its outputs.

    With ``channels_last`` (the default), rank-4 inputs and outputs are NHWC like the Keras model;
    otherwise NCHW. A model with one output returns a tensor, otherwise a list.
    """

    def __init__(self, graph: _Graph, channels_last: bool) -> None:
        super().__init__()
        self.graph = graph
        self.channels_last = channels_last

    def forward(self, *inputs: Tensor) -> Tensor | list[Tensor]:
        if self.channels_last:
            inputs = tuple(ops.from_keras_layout(x) for x in inputs)
        outputs = self.graph(*inputs)
        if self.channels_last:
            outputs = [ops.to_keras_layout(y) for y in outputs]
        return outputs[0] if len(outputs) == 1 else outputs


def from_keras(keras_model: keras.Model, *, channels_last: bool = True) -> KerasGraphModule:
    """A ``torch.nn.Module`` computing ``keras_model``'s function with its weights (module docstring).

    ``keras_model`` must be a built Functional or Sequential model (nested models allowed). Weights
    keep the Keras variables' dtype. The module is returned in eval mode (like calling the Keras model);
    ``.train()`` gives Keras' ``training=True``. Raises ``ValueError`` naming the first unsupported layer.
    """
    if not isinstance(keras_model, keras.Model):
        raise TypeError(f"keras_model must be a keras.Model, got {type(keras_model).__name__}")
    _check_supported(keras_model)
    return KerasGraphModule(_convert_model(keras_model, set()), channels_last).eval()
