"""Exact weight transfer between Keras models and PyTorch modules (LeNet-BN and alike).

Weighted layers are paired in model order (Keras ``model.layers``, PyTorch leaf modules), and
every pair is validated before anything is written, so a mismatch raises ``ValueError`` naming
the first layer that does not fit and leaves both models untouched.

Layouts (Keras -> PyTorch; the reverse is the inverse, so a round trip is bit-exact):

- ``Conv2D`` kernel (kh, kw, in, out) -> ``Conv2d`` weight (out, in, kh, kw); bias as is.
- ``Dense`` kernel (in, out) -> ``Linear`` weight (out, in).
- Feature order after ``Flatten``: Keras flattens NHWC as (h, w, c), PyTorch NCHW as (c, h, w).
  The first ``Dense`` after a channels-last ``Flatten`` (and any BN between them) gets its input
  features permuted: torch feature ``c*H*W + h*W + w`` is Keras feature ``h*W*C + w*C + c``.
- BN: gamma/beta <-> weight/bias, moving_mean/moving_variance <-> running_mean/running_var,
  epsilon <-> eps carried over as is, momentum converted between conventions by
  ``spec.convert_momentum`` (Keras 0.99 <-> torch 0.01). ``num_batches_tracked`` is copied where
  the Keras layer keeps a counter (``keras_bn.BatchNorm(convention="torch", momentum="cumulative")``,
  the only Keras form of torch's ``momentum=None``); otherwise PyTorch keeps its own count.
- Checked before copying: layer kinds and order, every shape, conv stride/dilation/groups/padding,
  bias presence, BN scale/center vs weight/bias, and that PyTorch's BN tracks running statistics.
  Activations are not compared (the inference tests catch a wrong one).

Running-variance estimator (the one thing a transfer cannot convert). ``torch.nn.BatchNorm`` feeds
the unbiased batch variance ``var * m / (m - 1)`` into its running average, Keras' built-in layer
the biased one. The *stored* value is copied verbatim both ways: it estimates the same population
variance, and inference uses it in the same formula, so logits agree exactly. It is not rescaled,
because it is an average over past batches whose ``m`` the model does not record. What differs is
how *future* training updates it (each update's contribution differs by exactly m/(m-1)); to keep
training identical, use ``keras_bn.BatchNorm(convention="torch")`` on the Keras side, or pass
``same_estimator=True`` to make any mismatch an error instead of a silent drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import torch
from torch import nn

import spec
from torch_ref.batch_norm import _BatchNorm

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, _BatchNorm)

__all__ = ["batch_norm_keras_to_torch", "batch_norm_torch_to_keras", "keras_to_torch", "torch_to_keras"]


@dataclass(frozen=True)
class _Unit:
    """A weighted layer of either framework, as the transfer sees it."""

    name: str
    kind: str  # "conv2d" | "dense" | "batch_norm"
    obj: Any
    # Keras side only: permutation of the input features for a Dense/BN fed by a channels-last Flatten.
    perm: np.ndarray | None = None


class _Plan:
    """Writes collected during validation and applied only once every layer has been checked."""

    def __init__(self) -> None:
        self._writes: list[Callable[[], None]] = []

    def tensor(self, target: torch.Tensor, value: np.ndarray) -> None:
        source = torch.from_numpy(np.array(value, order="C")).to(target.dtype)  # a copy: the source may change
        self._writes.append(lambda: target.copy_(source))

    def variable(self, target: keras.Variable, value: np.ndarray) -> None:
        source = np.array(value, dtype=keras.backend.standardize_dtype(target.dtype), order="C")
        self._writes.append(lambda: target.assign(source))

    def attribute(self, obj: Any, name: str, value: Any) -> None:
        self._writes.append(lambda: setattr(obj, name, value))

    def apply(self) -> None:
        with torch.no_grad():
            for write in self._writes:
                write()


def _is_keras_bn(layer: keras.Layer) -> bool:
    return hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance")


def _keras_leaves(model: keras.Layer) -> Iterator[keras.Layer]:
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, keras.Model):  # nested model: transfer its layers in place
            yield from _keras_leaves(layer)
        else:
            yield layer


def _flatten_permutation(layer: keras.layers.Flatten) -> np.ndarray | None:
    """torch feature j -> Keras feature perm[j] for a channels-last Flatten, or None if orders agree."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"keras layer {layer.name!r} (Flatten): cannot read its input shape ({err})") from None
    if layer.data_format == "channels_first" or len(shape) <= 2:
        return None
    if any(d is None for d in shape[1:]):
        raise ValueError(f"keras layer {layer.name!r} (Flatten) has an unknown input shape {shape}")
    *spatial, channels = shape[1:]
    keras_index = np.arange(int(np.prod(shape[1:]))).reshape(*spatial, channels)
    return np.moveaxis(keras_index, -1, 0).reshape(-1)  # enumerate Keras indices in (c, h, w) order


def _check_bn_axis(layer: keras.Layer, source: keras.Layer | None, channel_axis: int | None) -> None:
    """A Keras BN must normalize the channel axis of the layer it follows: torch's BatchNorm*d always does.

    Sizes alone cannot tell (a BN over the rows of a 6x6x6 map has 6 features like one over its
    channels), so the axis is compared, counted from the front of the BN's input.
    """
    if source is None or channel_axis is None:
        return  # no layer before it fixed a layout we follow (model input, Reshape, Permute)
    try:
        rank = len(layer.input.shape)
    except (AttributeError, ValueError) as err:
        raise ValueError(
            f"keras layer {layer.name!r} ({type(layer).__name__}): cannot read its input shape ({err})"
        ) from None
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    normalized = sorted(int(a) % rank for a in axes)
    if normalized != [channel_axis % rank]:
        raise ValueError(
            f"keras layer {layer.name!r} ({type(layer).__name__}) normalizes axis {layer.axis} of its {rank}D input, "
            f"but the channel axis after {source.name!r} ({type(source).__name__}) is {channel_axis % rank}: "
            "torch's BatchNorm normalizes channels, so its statistics and logits would differ"
        )


def _keras_units(model: keras.Layer) -> list[_Unit]:
    units, perm = [], None
    source, channel_axis = None, None  # the last layer that fixed the layout, and its channel axis
    for layer in _keras_leaves(model):
        if isinstance(layer, keras.layers.Flatten):
            perm = _flatten_permutation(layer)
            source, channel_axis = layer, -1
        elif isinstance(layer, keras.layers.Conv2D):
            units.append(_Unit(layer.name, "conv2d", layer))
            perm = None
            source, channel_axis = layer, (1 if layer.data_format == "channels_first" else -1)
        elif isinstance(layer, keras.layers.Dense):
            units.append(_Unit(layer.name, "dense", layer, perm))
            perm = None  # the Dense consumes the flattened order
            source, channel_axis = layer, -1
        elif isinstance(layer, (keras.layers.Reshape, keras.layers.Permute)):
            source, channel_axis = None, None  # a new layout we do not follow: no axis check after it
        elif _is_keras_bn(layer):
            _check_bn_axis(layer, source, channel_axis)
            units.append(_Unit(layer.name, "batch_norm", layer, perm))
        elif layer.weights:
            raise ValueError(f"keras layer {layer.name!r} ({type(layer).__name__}) has weights the transfer cannot map")
    return units


def _torch_units(module: nn.Module) -> list[_Unit]:
    units = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            units.append(_Unit(name, "conv2d", child))
        elif isinstance(child, nn.Linear):
            units.append(_Unit(name, "dense", child))
        elif isinstance(child, _TORCH_BN):
            units.append(_Unit(name, "batch_norm", child))
        elif any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
            raise ValueError(f"torch module {name!r} ({type(child).__name__}) has weights the transfer cannot map")
    return units


def _np(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return keras.ops.convert_to_numpy(value)


class _Mismatch(ValueError):
    pass


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise _Mismatch(reason)


def _keras_convention(layer: keras.Layer) -> str:
    """The spec convention a Keras BN layer updates its moving statistics by."""
    return getattr(layer, "convention", "keras")


def _check_conv(layer: keras.Layer, conv: nn.Conv2d) -> None:
    _expect(tuple(layer.strides) == tuple(conv.stride), f"strides {tuple(layer.strides)} vs {tuple(conv.stride)}")
    _expect(
        tuple(layer.dilation_rate) == tuple(conv.dilation),
        f"dilation {tuple(layer.dilation_rate)} vs {tuple(conv.dilation)}",
    )
    _expect(layer.groups == conv.groups, f"groups {layer.groups} vs {conv.groups}")
    torch_padding = conv.padding if isinstance(conv.padding, str) else ("valid" if not any(conv.padding) else None)
    _expect(
        layer.padding == torch_padding and conv.padding_mode == "zeros",
        f"padding {layer.padding!r} vs {conv.padding!r} ({conv.padding_mode})",
    )
    _expect(
        (layer.bias is None) == (conv.bias is None), f"use_bias {layer.bias is not None} vs {conv.bias is not None}"
    )


def _check_bn(layer: keras.Layer, bn: nn.Module, same_estimator: bool) -> None:
    _expect(bn.running_mean is not None, "the torch module does not track running statistics")
    _expect(
        (layer.gamma is None) == (bn.weight is None),
        f"Keras scale={layer.gamma is not None} vs torch weight={bn.weight is not None}",
    )
    _expect(
        (layer.beta is None) == (bn.bias is None),
        f"Keras center={layer.beta is not None} vs torch bias={bn.bias is not None}",
    )
    if same_estimator:
        keras_estimator = spec.get_convention(_keras_convention(layer)).running_variance
        torch_estimator = spec.get_convention("torch").running_variance
        _expect(
            keras_estimator == torch_estimator,
            f"running variance estimators differ (Keras {keras_estimator}, torch {torch_estimator}) "
            "and same_estimator=True",
        )


def _features(value: np.ndarray, perm: np.ndarray | None, *, to_torch: bool) -> np.ndarray:
    """Reorder a per-feature vector (axis 0) between Keras' and PyTorch's flatten orders."""
    if perm is None:
        return value
    if to_torch:
        return value[perm]
    out = np.empty_like(value)
    out[perm] = value
    return out


def _pairs(keras_units: list[_Unit], torch_units: list[_Unit]) -> Iterator[tuple[_Unit, _Unit]]:
    """Weighted layers paired in model order; a count or kind mismatch names the first misfit."""
    for index in range(max(len(keras_units), len(torch_units))):
        if index >= len(keras_units):
            extra = torch_units[index]
            raise ValueError(
                f"torch module {extra.name!r} ({type(extra.obj).__name__}) has no Keras counterpart: "
                f"the Keras model has {len(keras_units)} weighted layers, the torch model {len(torch_units)}"
            )
        if index >= len(torch_units):
            extra = keras_units[index]
            raise ValueError(
                f"keras layer {extra.name!r} ({type(extra.obj).__name__}) has no torch counterpart: "
                f"the Keras model has {len(keras_units)} weighted layers, the torch model {len(torch_units)}"
            )
        k, t = keras_units[index], torch_units[index]
        if k.kind != t.kind:
            raise _fit_error(k.name, k.obj, t.name, t.obj, f"a {k.kind} layer cannot take the weights of a {t.kind}")
        yield k, t


def _momentum_to_torch(layer: keras.Layer) -> float | None:
    convention, momentum = _keras_convention(layer), layer.momentum
    if momentum is None:
        _expect(convention == "torch", f"momentum=None is not defined for convention {convention!r}")
        return None
    return spec.convert_momentum(float(momentum), convention, "torch")


def _momentum_to_keras(bn: nn.Module, layer: keras.Layer) -> float | None:
    convention = _keras_convention(layer)
    if bn.momentum is None:
        _expect(
            convention == "torch" and _keras_counter(layer) is not None,
            f"torch momentum=None (cumulative average) needs a Keras layer that counts batches, "
            f"i.e. keras_bn.BatchNorm(convention='torch', momentum='cumulative'), got convention {convention!r}",
        )
        return None
    return spec.convert_momentum(float(bn.momentum), "torch", convention)


def _plan_keras_to_torch(k: _Unit, t: _Unit, plan: _Plan, same_estimator: bool) -> None:
    layer, module = k.obj, t.obj
    if k.kind == "conv2d":
        _check_conv(layer, module)
        kernel = _np(layer.kernel).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        _expect(
            kernel.shape == tuple(module.weight.shape), f"kernel {kernel.shape} vs weight {tuple(module.weight.shape)}"
        )
    elif k.kind == "dense":
        _expect((layer.bias is None) == (module.bias is None), "use_bias differs")
        kernel = _np(layer.kernel)
        _expect(
            kernel.shape[::-1] == tuple(module.weight.shape),
            f"kernel {kernel.shape} (in, out) vs weight {tuple(module.weight.shape)} (out, in)",
        )
        kernel = _features(kernel, k.perm, to_torch=True).T
    else:
        _plan_bn_keras_to_torch(layer, module, plan, same_estimator, k.perm)
        return
    plan.tensor(module.weight, kernel)
    if module.bias is not None:
        _expect(tuple(layer.bias.shape) == tuple(module.bias.shape), "bias shapes differ")
        plan.tensor(module.bias, _np(layer.bias))


def _plan_torch_to_keras(t: _Unit, k: _Unit, plan: _Plan, same_estimator: bool) -> None:
    module, layer = t.obj, k.obj
    if k.kind == "conv2d":
        _check_conv(layer, module)
        kernel = _np(module.weight).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif k.kind == "dense":
        _expect((layer.bias is None) == (module.bias is None), "use_bias differs")
        kernel = _features(_np(module.weight).T, k.perm, to_torch=False)
    else:
        _plan_bn_torch_to_keras(module, layer, plan, same_estimator, k.perm)
        return
    _expect(kernel.shape == tuple(layer.kernel.shape), f"weight {kernel.shape} vs kernel {tuple(layer.kernel.shape)}")
    plan.variable(layer.kernel, kernel)
    if layer.bias is not None:
        _expect(tuple(layer.bias.shape) == tuple(module.bias.shape), "bias shapes differ")
        plan.variable(layer.bias, _np(module.bias))


def _bn_pairs(layer: keras.Layer, bn: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    pairs = [(layer.moving_mean, bn.running_mean), (layer.moving_variance, bn.running_var)]
    if layer.gamma is not None:
        pairs.append((layer.gamma, bn.weight))
    if layer.beta is not None:
        pairs.append((layer.beta, bn.bias))
    for variable, tensor in pairs:
        _expect(
            tuple(variable.shape) == tuple(tensor.shape),
            f"{variable.path.split('/')[-1]} {tuple(variable.shape)} vs {tuple(tensor.shape)}",
        )
    return pairs


def _keras_counter(layer: keras.Layer) -> keras.Variable | None:
    """keras_bn.BatchNorm's batch counter (present only where its convention needs one)."""
    return getattr(layer, "num_batches_tracked", None)


def _plan_bn_keras_to_torch(layer, bn, plan: _Plan, same_estimator: bool, perm: np.ndarray | None = None) -> None:
    _check_bn(layer, bn, same_estimator)
    for variable, tensor in _bn_pairs(layer, bn):
        plan.tensor(tensor, _features(_np(variable), perm, to_torch=True))
    plan.attribute(bn, "eps", float(layer.epsilon))
    plan.attribute(bn, "momentum", _momentum_to_torch(layer))
    if _keras_counter(layer) is not None:  # else torch keeps its own count (used only by momentum=None)
        plan.tensor(bn.num_batches_tracked, _np(_keras_counter(layer)))


def _plan_bn_torch_to_keras(bn, layer, plan: _Plan, same_estimator: bool, perm: np.ndarray | None = None) -> None:
    _check_bn(layer, bn, same_estimator)
    for variable, tensor in _bn_pairs(layer, bn):
        plan.variable(variable, _features(_np(tensor), perm, to_torch=False))
    plan.attribute(layer, "epsilon", float(bn.eps))
    plan.attribute(layer, "momentum", _momentum_to_keras(bn, layer))
    if _keras_counter(layer) is not None:
        plan.variable(_keras_counter(layer), _np(bn.num_batches_tracked))


def _reset_compiled(keras_model: keras.Layer) -> None:
    """Forget Keras' traced predict/train functions: they captured the old epsilon/momentum as constants."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(keras_model, name, None) is not None:
            setattr(keras_model, name, None)


def _fit_error(k_name: str, k_obj: Any, t_name: str, t_obj: Any, reason: str) -> ValueError:
    torch_label = f"{t_name!r} " if t_name else ""
    return ValueError(
        f"keras layer {k_name!r} ({type(k_obj).__name__}) does not fit torch module {torch_label}"
        f"({type(t_obj).__name__}): {reason}"
    )


def _require_bn_pair(layer: Any, module: Any) -> None:
    if not _is_keras_bn(layer) or not isinstance(module, _TORCH_BN):
        raise TypeError(
            f"expected a Keras BN layer and a torch BN module, got {type(layer).__name__} and {type(module).__name__}"
        )


def batch_norm_keras_to_torch(layer: keras.Layer, module: nn.Module, *, same_estimator: bool = False) -> None:
    """Copy one Keras BN layer into one PyTorch BN module, in place (see the module docstring)."""
    _require_bn_pair(layer, module)
    plan = _Plan()
    try:
        _plan_bn_keras_to_torch(layer, module, plan, same_estimator)
    except _Mismatch as err:
        raise _fit_error(layer.name, layer, "", module, str(err)) from None
    plan.apply()


def batch_norm_torch_to_keras(module: nn.Module, layer: keras.Layer, *, same_estimator: bool = False) -> None:
    """Copy one PyTorch BN module into one Keras BN layer, in place (see the module docstring)."""
    _require_bn_pair(layer, module)
    plan = _Plan()
    try:
        _plan_bn_torch_to_keras(module, layer, plan, same_estimator)
    except _Mismatch as err:
        raise _fit_error(layer.name, layer, "", module, str(err)) from None
    plan.apply()


def keras_to_torch(keras_model: keras.Layer, torch_model: nn.Module, *, same_estimator: bool = False) -> nn.Module:
    """Copy every weight of ``keras_model`` into ``torch_model`` in place; returns ``torch_model``.

    Raises ``ValueError`` naming the first layer pair that does not fit, before writing anything.
    """
    plan = _Plan()
    for k, t in _pairs(_keras_units(keras_model), _torch_units(torch_model)):
        try:
            _plan_keras_to_torch(k, t, plan, same_estimator)
        except _Mismatch as err:
            raise _fit_error(k.name, k.obj, t.name, t.obj, str(err)) from None
    plan.apply()
    return torch_model


def torch_to_keras(torch_model: nn.Module, keras_model: keras.Layer, *, same_estimator: bool = False) -> keras.Layer:
    """Copy every weight of ``torch_model`` into ``keras_model`` in place; returns ``keras_model``.

    Raises ``ValueError`` naming the first layer pair that does not fit, before writing anything.
    """
    plan = _Plan()
    for k, t in _pairs(_keras_units(keras_model), _torch_units(torch_model)):
        try:
            _plan_torch_to_keras(t, k, plan, same_estimator)
        except _Mismatch as err:
            raise _fit_error(k.name, k.obj, t.name, t.obj, str(err)) from None
    plan.apply()
    _reset_compiled(keras_model)
    return keras_model
