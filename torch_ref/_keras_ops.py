"""PyTorch modules that compute what single Keras 3 layers compute, used by ``torch_ref.from_keras``.

Layout inside a converted graph: a rank-4 tensor (Keras NHWC) is held as NCHW, so convolutions,
pooling and BN run in PyTorch's native layout; tensors of any other rank are held as Keras holds
them. ``keras_axis_to_torch`` maps a Keras axis to the dimension holding it. Each module below
takes and returns tensors in that layout and cites the Keras formula it mirrors where it matters
for exactness (e.g. TensorFlow's asymmetric 'same' padding, Keras' ``hard_sigmoid``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d

SPATIAL_RANK = 4  # (N, H, W, C) in Keras, held as (N, C, H, W) here


def keras_axis_to_torch(axis: int, rank: int) -> int:
    """The dimension that holds Keras axis ``axis`` of a rank-``rank`` tensor in this layout."""
    axis = axis % rank
    if rank == SPATIAL_RANK:
        return (0, 2, 3, 1)[axis]
    return axis


def to_keras_layout(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == SPATIAL_RANK else x


def from_keras_layout(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == SPATIAL_RANK else x


# --- activations: Keras' formulas (keras/src/activations/activations.py, backend/tensorflow/nn.py) ---


def _hard_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3.0) / 6.0  # Keras: relu6(x + 3) / 6 (same function as torch's Hardsigmoid)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,  # keras.activations.swish is silu
    "hard_sigmoid": _hard_sigmoid,
    "hard_silu": lambda x: x * _hard_sigmoid(x),  # Keras' hard_swish is hard_silu
    "gelu": F.gelu,  # keras.activations.gelu(approximate=False), the erf form
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "mish": F.mish,
    "exponential": torch.exp,
}
# Functions of an axis: Keras applies them on axis -1.
AXIS_ACTIVATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {"softmax": F.softmax, "log_softmax": F.log_softmax}


def activation_name(fn: Callable | None) -> str:
    """Keras' registered name of an activation function (``linear`` for None)."""
    return "linear" if fn is None else getattr(fn, "__name__", type(fn).__name__)


def is_supported_activation(name: str) -> bool:
    return name in ACTIVATIONS or name in AXIS_ACTIVATIONS


class Activation(nn.Module):
    """A Keras activation by name; softmax-like ones act on Keras' last axis."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if not is_supported_activation(name):
            raise ValueError(f"unsupported activation {name!r}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        if self.name in AXIS_ACTIVATIONS:
            return AXIS_ACTIVATIONS[self.name](x, keras_axis_to_torch(-1, x.dim()))
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class ReLU(nn.Module):
    """``keras.layers.ReLU``: ``x`` above ``threshold``, ``negative_slope * (x - threshold)`` below, capped.

    Built from the same pieces as Keras (``keras/src/activations/activations.py``, ``ReLU.static_call``),
    so the value and the gradient agree also at the kinks: at ``x == threshold`` (Keras keeps ``x`` only
    where ``x > threshold``) and at ``x == 6`` with ``max_value=6``, where Keras calls ``relu6``, whose
    gradient is 0 there, while a clip's gradient at its bound is 1. ``leaky_slope``: the slope Keras'
    backend really uses in its plain leaky-ReLU branch (TensorFlow's LeakyRelu takes a float32 attribute,
    so 0.1 is 0.10000000149 also in float64); ``negative_slope`` when None.
    """

    def __init__(
        self, max_value: float | None, negative_slope: float, threshold: float, leaky_slope: float | None = None
    ) -> None:
        super().__init__()
        self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold
        self.leaky_slope = negative_slope if leaky_slope is None else leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        slope, threshold, max_value = self.negative_slope, self.threshold, self.max_value
        if slope != 0.0 and max_value is None and threshold == 0.0:
            return F.leaky_relu(x, self.leaky_slope)
        clip = max_value is not None
        if threshold != 0.0:
            y = torch.where(x > threshold, x, torch.zeros_like(x))
        elif max_value == 6.0:
            y, clip = F.relu6(x), False  # TF's Relu6Grad: 0 at both ends, like hardtanh's
        else:
            y = F.relu(x)
        if clip:
            y = torch.clamp(y, 0.0, max_value)
        if slope != 0.0:
            y = y - slope * F.relu(threshold - x)
        return y

    def extra_repr(self) -> str:
        return f"max_value={self.max_value}, negative_slope={self.negative_slope}, threshold={self.threshold}"


class Softmax(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(x, keras_axis_to_torch(self.axis, x.dim()))


# --- padding: TensorFlow's 'same' puts the odd extra pixel at the bottom/right ---


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's SAME padding of one dimension, ``(before, after)`` (tensorflow/core/framework/kernel_shape_util.cc)."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class _Spatial(nn.Module):
    """Shared 'same'/'valid' handling of Conv/Pool layers over NCHW input."""

    def _init_padding(
        self, padding: str, kernel: Sequence[int], strides: Sequence[int], dilation: Sequence[int]
    ) -> None:
        self.padding, self.kernel = padding, tuple(kernel)
        self.strides, self.dilation = tuple(strides), tuple(dilation)

    def _pad(self, x: Tensor, value: float = 0.0) -> Tensor:
        if self.padding == "valid":
            return x
        (top, bottom), (left, right) = (
            same_padding(int(x.shape[2 + i]), self.kernel[i], self.strides[i], self.dilation[i]) for i in range(2)
        )
        if not (top or bottom or left or right):
            return x
        return F.pad(x, (left, right, top, bottom), value=value)


class Conv2d(_Spatial):
    """Conv2D / DepthwiseConv2D (``groups`` = channels) with TF 'same' padding and the layer's activation."""

    def __init__(self, conv: nn.Conv2d, padding: str, activation: str) -> None:
        super().__init__()
        self.conv = conv
        self._init_padding(padding, conv.kernel_size, conv.stride, conv.dilation)
        self.activation = Activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.conv(self._pad(x)))


class SeparableConv2d(nn.Module):
    """SeparableConv2D: depthwise (strides, dilation, padding) then a 1x1 pointwise conv with the bias."""

    def __init__(self, depthwise: Conv2d, pointwise: nn.Conv2d, activation: str) -> None:
        super().__init__()
        self.depthwise, self.pointwise = depthwise, pointwise
        self.activation = Activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.pointwise(self.depthwise(x)))


class Dense(nn.Module):
    """Dense on Keras' last axis (the channel dimension of an NCHW tensor)."""

    def __init__(self, linear: nn.Linear, activation: str) -> None:
        super().__init__()
        self.linear = linear
        self.activation = Activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == SPATIAL_RANK:
            return self.activation(self.linear(x.movedim(1, -1)).movedim(-1, 1))
        return self.activation(self.linear(x))


class Pool2d(_Spatial):
    """Max/AveragePooling2D. TF's 'same' average excludes the padding from each window's count."""

    def __init__(self, kind: str, pool_size: Sequence[int], strides: Sequence[int], padding: str) -> None:
        super().__init__()
        self.kind = kind
        self._init_padding(padding, pool_size, strides, (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            return F.max_pool2d(self._pad(x, value=-math.inf), self.kernel, self.strides)
        pooled = F.avg_pool2d(self._pad(x), self.kernel, self.strides)
        if self.padding == "valid":
            return pooled
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return pooled / F.avg_pool2d(self._pad(ones), self.kernel, self.strides)  # fraction of real pixels

    def extra_repr(self) -> str:
        return f"{self.kind}, pool_size={self.kernel}, strides={self.strides}, padding={self.padding!r}"


class GlobalPool2d(nn.Module):
    def __init__(self, kind: str, keepdims: bool) -> None:
        super().__init__()
        self.kind, self.keepdims = kind, keepdims

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            return x.amax(dim=(2, 3), keepdim=self.keepdims)
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class ZeroPad2d(nn.Module):
    def __init__(self, padding: Sequence[Sequence[int]]) -> None:
        super().__init__()
        (self.top, self.bottom), (self.left, self.right) = padding

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (self.left, self.right, self.top, self.bottom))


class Flatten(nn.Module):
    """Flattens in Keras' order ((h, w, c) for NHWC), so the next Dense takes Keras' kernel unpermuted."""

    def forward(self, x: Tensor) -> Tensor:
        return to_keras_layout(x).flatten(1)


class Reshape(nn.Module):
    def __init__(self, target_shape: Sequence[int]) -> None:
        super().__init__()
        self.target_shape = tuple(int(d) for d in target_shape)

    def forward(self, x: Tensor) -> Tensor:
        return from_keras_layout(to_keras_layout(x).reshape(x.shape[0], *self.target_shape))


class Merge(nn.Module):
    """Add / Subtract / Multiply / Average / Maximum / Minimum / Concatenate over a list of inputs."""

    def __init__(self, kind: str, axis: int = -1) -> None:
        super().__init__()
        self.kind, self.axis = kind, axis

    def forward(self, inputs: list[Tensor]) -> Tensor:
        first, *rest = inputs
        if self.kind == "concatenate":
            return torch.cat(inputs, dim=keras_axis_to_torch(self.axis, first.dim()))
        if self.kind == "subtract":
            return first - rest[0]
        out = first
        for x in rest:
            if self.kind in ("add", "average"):
                out = out + x
            elif self.kind == "multiply":
                out = out * x
            elif self.kind == "maximum":
                out = torch.maximum(out, x)
            else:
                out = torch.minimum(out, x)
        return out / len(inputs) if self.kind == "average" else out

    def extra_repr(self) -> str:
        return self.kind


def _per_channel(value: Tensor, x: Tensor) -> Tensor:
    """A Keras constant broadcast on the last axis, laid out for ``x`` (NCHW for rank 4)."""
    if value.dim() == SPATIAL_RANK:
        return value.permute(0, 3, 1, 2)
    if value.dim() == 1 and value.numel() > 1 and x.dim() == SPATIAL_RANK:
        return value.view(1, -1, 1, 1)
    return value


class Rescaling(nn.Module):
    """``x * scale + offset`` (keras.layers.Rescaling; per-channel lists broadcast on the channel axis)."""

    def __init__(self, scale: Tensor, offset: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def forward(self, x: Tensor) -> Tensor:
        return x * _per_channel(self.scale, x) + _per_channel(self.offset, x)


class Normalization(nn.Module):
    """keras.layers.Normalization: ``(x - mean) / max(sqrt(variance), keras.backend.epsilon())``."""

    def __init__(self, mean: Tensor, variance: Tensor, epsilon: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("variance", variance)
        self.epsilon = epsilon

    def forward(self, x: Tensor) -> Tensor:
        std = torch.clamp(torch.sqrt(_per_channel(self.variance, x)), min=self.epsilon)
        return (x - _per_channel(self.mean, x)) / std


class Dropout(nn.Module):
    """keras.layers.Dropout: identity in eval mode; in training the same distribution, not Keras' mask.

    ``noise_shape`` is Keras' (in Keras' layout; None entries take the input's size), e.g.
    ``(None, 1, 1, 1)`` drops whole samples (EfficientNet's stochastic depth).
    """

    def __init__(self, rate: float, noise_shape: Sequence[int | None] | None = None) -> None:
        super().__init__()
        self.rate, self.noise_shape = rate, None if noise_shape is None else tuple(noise_shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if self.noise_shape is None:
            return F.dropout(x, self.rate, training=True)
        keras_shape = to_keras_layout(x).shape
        shape = [size if wanted is None else wanted for size, wanted in zip(keras_shape, self.noise_shape, strict=True)]
        keep = torch.rand(shape, dtype=x.dtype, device=x.device) >= self.rate
        return x * from_keras_layout(keep.to(x.dtype)) / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, noise_shape={self.noise_shape}"


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


# --- Batch normalization with the Keras layer's layout and trainable flag ---


class _KerasLayerBatchNorm:
    """torch_ref BN as a converted Keras BN layer: its channel axis, ``trainable`` flag and convention.

    ``convention`` (set from the Keras layer, e.g. "keras": biased running variance) and ``momentum``
    (PyTorch's meaning, converted by ``spec.convert_momentum``) are torch_ref.BatchNorm*d's own;
    this class adds only ``channel_dim``, where the Keras BN axis lives, and ``frozen``, Keras'
    ``trainable=False`` (inference mode always, also in ``fit``).
    """

    channel_dim: int = 1
    frozen: bool = False

    def forward(self, x: Tensor) -> Tensor:
        moved = self.channel_dim != 1
        if moved:
            x = x.movedim(self.channel_dim, 1)
        y = self._forward(x, self.training and not self.frozen)
        return y.movedim(1, self.channel_dim) if moved else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convention={self.convention!r}, channel_dim={self.channel_dim}"


class KerasBatchNorm1d(_KerasLayerBatchNorm, BatchNorm1d):
    """A torch_ref.BatchNorm1d that updates its statistics by a Keras layer's convention."""


class KerasBatchNorm2d(_KerasLayerBatchNorm, BatchNorm2d):
    """A torch_ref.BatchNorm2d that updates its statistics by a Keras layer's convention."""


class KerasBatchNorm3d(_KerasLayerBatchNorm, BatchNorm3d):
    """A torch_ref.BatchNorm3d that updates its statistics by a Keras layer's convention."""


BATCH_NORM_BY_RANK = {2: KerasBatchNorm1d, 3: KerasBatchNorm1d, 4: KerasBatchNorm2d, 5: KerasBatchNorm3d}
