"""Fold inference-mode BatchNormalization into the preceding Conv, Gemm or MatMul(+Add) of an ONNX graph.

Inference BN is a per-channel affine map (``spec.batch_norm_infer``, channel axis 1):

    y = gamma * (z - mean) / sqrt(var + eps) + beta = s * z + t,
    s = gamma / sqrt(var + eps),   t = beta - mean * s.

When z = W x + b comes from a linear op whose output channel o owns one slice W[o] of the weight
(Conv: axis 0 of (O, I/g, kH, kW); Gemm transB=1: axis 0 of (O, I); Gemm transB=0 / MatMul: axis 1
of (I, O)), the BN disappears into the op:

    W'[o] = W[o] * s[o],        b'[o] = (b[o] - mean[o]) * s[o] + beta[o].

Numerics: s, W' and b' are computed in float64 from the float32 parameters (eps rounded to float32
first, as the ONNX attribute stores it) and rounded to float32 once, so each folded weight is within
half an ulp of the exact product. Exporters that fold in float32 (onnxscript) differ from ours by
about one ulp; a folded network differs from the unfolded one by float32 re-association only
(the product is rounded before the convolution sum instead of after).

A BN with no such op before it (DenseNet's pre-activation BN after a Concat, a BN after an Add)
has nothing to fold into: :func:`affine_batchnorm` writes it as its affine map, ``Mul(z, s)`` then
``Add(., t)``, with s and t from the same float64 computation rounded once to the BN's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.onnx.graph import BatchNormParams, _drop_unused

__all__ = ["affine_batchnorm", "fold_batchnorm", "fold_weights"]


def fold_weights(
    weight: np.ndarray, bias: np.ndarray | None, bn: BatchNormParams, *, out_axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` in float32: W' = W * s along ``out_axis``, b' = (b - mean) * s + beta.

    s = gamma / sqrt(var + eps); all arithmetic in float64, one rounding to float32 at the end.
    """
    weight = np.asarray(weight)
    channels = bn.channels
    if weight.shape[out_axis] != channels:
        raise ValueError(
            f"BN {bn.name!r} has {channels} channels but the weight {weight.shape} has {weight.shape[out_axis]} "
            f"output channels on axis {out_axis}"
        )
    bias = np.zeros(channels) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    if bias.size != channels:
        raise ValueError(f"bias of size {bias.size} does not match the {channels} channels of BN {bn.name!r}")
    scale, _ = bn.affine()
    mean = np.asarray(bn.mean, np.float64).reshape(-1)
    beta = np.asarray(bn.beta, np.float64).reshape(-1)
    shape = [1] * weight.ndim
    shape[out_axis] = channels
    folded_w = weight.astype(np.float64) * scale.reshape(shape)
    folded_b = (bias - mean) * scale + beta
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    """Lookups over a GraphProto that the folding pass keeps up to date."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.init = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.outputs = {o.name for o in graph.output}

    def uses(self, value: str) -> int:
        return sum(name == value for n in self.graph.node for name in n.input) + (value in self.outputs)

    def const(self, name: str, where: str) -> np.ndarray:
        if name not in self.init:
            raise ValueError(f"{where}: input {name!r} is not an initializer, so it cannot be folded")
        return numpy_helper.to_array(self.init[name])

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        name, k = hint, 0
        taken = set(self.init) | set(self.producer) | {i.name for i in self.graph.input}
        while name in taken:
            k += 1
            name = f"{hint}_{k}"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.init[name] = tensor
        return name


def _bn_params(g: _Graph, bn: onnx.NodeProto) -> BatchNormParams:
    where = f"BatchNormalization {bn.name!r}"
    if _attr(bn, "training_mode", 0):
        raise ValueError(f"{where} is in training mode; only inference-mode BN can be folded")
    if len([o for o in bn.output if o]) != 1:
        raise ValueError(f"{where} has running-statistics outputs; only inference-mode BN can be folded")
    arrays = [g.const(name, where) for name in bn.input[1:5]]
    return BatchNormParams(bn.name or bn.output[0], *arrays, epsilon=float(_attr(bn, "epsilon", 1e-5)))


def _per_channel_bias(array: np.ndarray, channels: int, where: str) -> np.ndarray:
    if array.size != channels or (array.ndim == 2 and array.shape[0] != 1) or array.ndim > 2:
        raise ValueError(f"{where}: bias of shape {array.shape} is not one value per output channel ({channels})")
    return array.reshape(-1)


def _fold_one(g: _Graph, bn: onnx.NodeProto, ranks: dict[str, int]) -> None:
    params = _bn_params(g, bn)
    z = bn.input[0]
    producer = g.producer.get(z)
    where = f"BatchNormalization {bn.name!r}"
    # Shape(z) == Shape(BN(z)): such readers may move to the BN's output, which the folded op will produce.
    shape_readers = [n for n in g.graph.node if n.op_type == "Shape" and z in n.input]
    if producer is None or g.uses(z) != 1 + len(shape_readers):
        raise ValueError(f"{where}: its input {z!r} is not produced by a node used only by this BN")
    name = producer.name or producer.output[0]
    if producer.op_type == "Conv":
        w_name = producer.input[1]
        bias = g.const(producer.input[2], where) if len(producer.input) > 2 and producer.input[2] else None
        w, b = fold_weights(g.const(w_name, where), bias, params, out_axis=0)
        producer.input[1:] = [g.add_initializer(w, f"{name}.weight"), g.add_initializer(b, f"{name}.bias")]
        last = producer
    elif producer.op_type == "Gemm":
        # Y = alpha * A' B' + beta * C: fold s into B along the output axis and beta into the new C.
        out_axis = 0 if _attr(producer, "transB", 0) else 1
        gemm_beta = float(_attr(producer, "beta", 1.0))
        bias = None
        if len(producer.input) > 2 and producer.input[2]:
            bias = gemm_beta * _per_channel_bias(g.const(producer.input[2], where), params.channels, where)
        w, b = fold_weights(g.const(producer.input[1], where), bias, params, out_axis=out_axis)
        producer.input[1:] = [g.add_initializer(w, f"{name}.weight"), g.add_initializer(b, f"{name}.bias")]
        kept = [a for a in producer.attribute if a.name != "beta"]
        del producer.attribute[:]
        producer.attribute.extend(kept)
        last = producer
    elif producer.op_type in ("Add", "MatMul"):
        add = producer if producer.op_type == "Add" else None
        matmul = producer
        bias = None
        if add is not None:
            bias_index = next((i for i, v in enumerate(add.input) if v in g.init), None)
            matmul = g.producer.get(add.input[1 - bias_index]) if bias_index is not None else None
            if matmul is None or matmul.op_type != "MatMul" or g.uses(matmul.output[0]) != 1:
                raise ValueError(f"{where} follows Add {name!r}, which is not a bias added to a MatMul")
            bias = _per_channel_bias(g.const(add.input[bias_index], where), params.channels, where)
        weight = g.const(matmul.input[1], where)
        if weight.ndim != 2 or ranks.get(z) != 2:
            raise ValueError(f"{where}: MatMul {matmul.name!r} is not a 2-D (N, in) x (in, out) product")
        w, b = fold_weights(weight, bias, params, out_axis=1)
        mm_name = matmul.name or matmul.output[0]
        matmul.input[1] = g.add_initializer(w, f"{mm_name}.weight")
        b_name = g.add_initializer(b, f"{mm_name}.bias")
        if add is None:
            # A bias-free MatMul gains an Add. Insert it last: the graph holds a copy of what is inserted.
            new = helper.make_node("Add", [z, b_name], [bn.output[0]], name=f"{mm_name}.bias_add")
            g.graph.node.insert(list(g.graph.node).index(matmul) + 1, new)
            add = g.graph.node[list(g.graph.node).index(matmul) + 1]
        else:
            add.input[bias_index] = b_name
        last = add
    else:
        raise ValueError(f"{where} follows {producer.op_type} {name!r}, which has no weights to fold into")
    last.output[0] = bn.output[0]  # the folded op now produces what the BN produced
    for reader in shape_readers:
        reader.input[0] = bn.output[0]
    g.graph.node.remove(bn)


def fold_batchnorm(model: onnx.ModelProto, *, strict: bool = True) -> onnx.ModelProto:
    """Return a copy of ``model`` with every inference BN folded into its producer (see module docstring).

    ``strict`` (default): a BN that cannot be folded (no Conv/Gemm/MatMul before it, shared or
    non-constant weights, training mode) raises ValueError naming it. ``strict=False`` leaves it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    g = _Graph(out.graph)
    for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        try:
            _fold_one(g, bn, ranks)
        except ValueError:
            if strict:
                raise
        g = _Graph(out.graph)  # producers and initializers changed
    _drop_unused(out.graph)
    return out


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        if v.type.tensor_type.HasField("shape")
    }


def _affine_one(g: _Graph, bn: onnx.NodeProto, ranks: dict[str, int]) -> None:
    params = _bn_params(g, bn)
    where = f"BatchNormalization {bn.name!r}"
    rank = ranks.get(bn.input[0])
    if rank is None or rank < 2:
        raise ValueError(f"{where}: the rank of its input {bn.input[0]!r} is unknown, so its channel axis is too")
    scale, shift = params.affine()
    # ONNX BN normalizes axis 1; (C, 1, ..., 1) broadcasts against (N, C, d1, ...) from the right.
    shape = (params.channels,) + (1,) * (rank - 2)
    dtype = numpy_helper.to_array(g.init[bn.input[1]]).dtype
    name = bn.name or bn.output[0]
    scale_name = g.add_initializer(scale.reshape(shape).astype(dtype), f"{name}.affine_scale")
    shift_name = g.add_initializer(shift.reshape(shape).astype(dtype), f"{name}.affine_shift")
    values = {v for n in g.graph.node for v in (*n.input, *n.output)} | set(g.init)
    scaled, k = f"{name}.affine_scaled", 0
    while scaled in values:
        k += 1
        scaled = f"{name}.affine_scaled_{k}"
    mul = helper.make_node("Mul", [bn.input[0], scale_name], [scaled], name=f"{name}.affine_mul")
    add = helper.make_node("Add", [scaled, shift_name], [bn.output[0]], name=f"{name}.affine_add")
    at = list(g.graph.node).index(bn)
    g.graph.node.remove(bn)
    g.graph.node.insert(at, add)
    g.graph.node.insert(at, mul)


def affine_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every inference BN replaced by its affine map ``Mul(z, s)``, ``Add(., t)``.

    s = gamma / sqrt(var + eps), t = beta - mean * s by ``spec.inference_affine`` in float64 (eps as
    float32), rounded once to the BN's dtype and shaped (C, 1, ..., 1) for channel axis 1. Meant for
    the BN that :func:`fold_batchnorm` cannot fold; a training-mode BN raises ValueError naming it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ranks = _ranks(out)
    g = _Graph(out.graph)
    for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        _affine_one(g, bn, ranks)
    _drop_unused(out.graph)
    return out
