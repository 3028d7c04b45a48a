"""ONNX graph surgery shared by the exporters: names, batch axis, metadata, IR version, BN restoration.

Both exporters hand us a valid graph that is not quite the one we ship. This module makes the
difference explicit and checkable:

- :func:`set_io` gives the graph its public names ("images" -> "logits") and a symbolic batch axis;
- :func:`restore_batchnorm` turns the per-channel ``Mul``/``Add`` chains that tf2onnx emits for
  Keras' built-in BN layer back into one ONNX ``BatchNormalization`` node, after checking that the
  chain's constants are ``gamma / sqrt(var + eps)`` and ``beta - mean * gamma / sqrt(var + eps)``
  of that layer (so the node computes what the exporter computed, but with the operator's own
  semantics and the layer's real statistics in the file); for ``keras_bn.BatchNorm``, whose fused
  TF kernel tf2onnx already maps to the node, it checks the node's parameters and strips the
  reshapes around it;
- :func:`finalize` sets metadata and the IR version and runs ``onnx.checker`` plus strict shape
  inference, so no file leaves this module unchecked;
- :func:`batchnorm_training_model` builds the one-node training-mode graph (opset 15).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

import spec

__all__ = [
    "BATCH_DIM",
    "OPSET",
    "TRAINING_OPSET",
    "BatchNormParams",
    "batchnorm_nodes",
    "batchnorm_training_model",
    "check_model",
    "finalize",
    "ir_version_for",
    "metadata",
    "restore_batchnorm",
    "set_io",
]

#: Opset of every exported model: >= 15 as required, the newest both exporters emit natively
#: (tf2onnx 1.17 stops at 18; torch's dynamo exporter targets 18 and would down-convert otherwise).
OPSET = 18
#: BatchNormalization-15 is the version with training_mode and typed running statistics.
TRAINING_OPSET = 15
#: Symbolic name of the dynamic leading axis on inputs and outputs.
BATCH_DIM = "batch"


@dataclass(frozen=True)
class BatchNormParams:
    """One inference-mode BN layer as stored: y = gamma * (x - mean) / sqrt(var + eps) + beta (channels at axis 1)."""

    name: str
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    #: the (weight, bias) of the Conv feeding this BN, in ONNX layout ((O, I/g, kh, kw), bias None if
    #: absent), when known: lets :func:`restore_batchnorm` undo a fold the exporter did on its own.
    producer: tuple[np.ndarray, np.ndarray | None] | None = field(default=None, compare=False, repr=False)

    @property
    def channels(self) -> int:
        return int(np.asarray(self.gamma).size)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(scale, shift)`` in float64: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
        gamma, beta, mean, var = (np.asarray(a, np.float64).reshape(-1) for a in self.arrays())
        # eps enters as float32, as every runtime stores it (the ONNX attribute is a float32).
        return spec.inference_affine(mean, var, gamma, beta, eps=float(np.float32(self.epsilon)), xp=np)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(gamma, beta, mean, var), the order of BatchNormalization's inputs 1-4."""
        return self.gamma, self.beta, self.mean, self.var


def ir_version_for(model: onnx.ModelProto) -> int:
    """The smallest IR version that carries the model's opsets.

    onnx >= 1.23 stamps IR 14 on new models, which onnxruntime < 1.32 refuses ("max supported IR
    version: 13"; 1.32 loads it); the minimum for the opsets (8 for opset 15-18) is accepted by every
    runtime that implements those opsets.
    """
    return helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def _set_metadata(model: onnx.ModelProto, props: Mapping[str, object]) -> None:
    merged = metadata(model)
    merged.update({str(k): str(v) for k, v in props.items()})
    del model.metadata_props[:]
    for key in sorted(merged):
        model.metadata_props.add(key=key, value=merged[key])


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ``onnx.checker`` (full check) and strict, typed shape inference; return the inferred model."""
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def finalize(model: onnx.ModelProto, props: Mapping[str, object]) -> onnx.ModelProto:
    """Stamp metadata and the IR version, drop stale value_info, and check. Returns the model (modified in place)."""
    _set_metadata(model, props)
    model.ir_version = ir_version_for(model)
    # Intermediate shapes from the exporter can name the batch axis differently ("unk__36");
    # inference recomputes them from the renamed inputs.
    del model.graph.value_info[:]
    check_model(model)
    return model


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    if new in taken:
        raise ValueError(f"cannot rename {old!r} to {new!r}: the graph already has a value called {new!r}")
    for node in graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _set_batch_dim(value: onnx.ValueInfoProto, batch_dim: str) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        raise ValueError(f"{value.name!r} has no shape, so it has no batch axis to make dynamic")
    dims[0].Clear()
    dims[0].dim_param = batch_dim


def set_io(model: onnx.ModelProto, input_name: str, output_name: str, batch_dim: str = BATCH_DIM) -> onnx.ModelProto:
    """Rename the single input and output and make their leading axis the symbolic ``batch_dim``."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got inputs {[i.name for i in inputs]} "
            f"and outputs {[o.name for o in graph.output]}"
        )
    _rename_value(graph, inputs[0].name, input_name)
    _rename_value(graph, graph.output[0].name, output_name)
    _set_batch_dim(inputs[0], batch_dim)
    _set_batch_dim(graph.output[0], batch_dim)
    return model


def batchnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


# ---------------------------------------------------------------------------------------------
# Restoring BatchNormalization nodes in a tf2onnx export of a Keras model


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _in_scope(node: onnx.NodeProto, layer: str) -> bool:
    """tf2onnx keeps TF op names, ``<model>/<layer>_<k>/batchnorm/mul_1``: match the layer's name scope."""
    pattern = re.compile(rf"{re.escape(layer)}(_\d+)?")
    return any(pattern.fullmatch(part) for part in node.name.split("/")[:-1])


def _per_channel(value: np.ndarray, rank: int, channels: int, where: str) -> np.ndarray:
    """A constant that broadcasts along axis 1 only (or a scalar), as a (channels,) float64 vector."""
    shape = (1,) * (rank - value.ndim) + value.shape
    if value.ndim > rank or any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        raise ValueError(f"{where}: constant of shape {value.shape} is not per-channel on axis 1 of rank {rank}")
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))


def _compose_chain(chain, constants, rank: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Compose Mul/Add/Sub/Div-by-constant nodes into y = scale * x + shift (float64)."""
    scale, shift = np.ones(channels), np.zeros(channels)
    for node, x_index in chain:
        c = _per_channel(constants[node.input[1 - x_index]], rank, channels, f"node {node.name!r}")
        if node.op_type == "Mul":
            scale, shift = scale * c, shift * c
        elif node.op_type == "Add":
            shift = shift + c
        elif node.op_type == "Sub" and x_index == 0:  # x - c
            shift = shift - c
        elif node.op_type == "Sub":  # c - x
            scale, shift = -scale, c - shift
        elif node.op_type == "Div" and x_index == 0:
            scale, shift = scale / c, shift / c
        else:
            raise ValueError(f"node {node.name!r}: {node.op_type} with x as divisor is not an affine map of x")
    return scale, shift


def _find_chain(graph: onnx.GraphProto, scoped, layer: str, constants: Mapping[str, np.ndarray]):
    """The BN layer's elementwise nodes, in order, each as (node, index of its non-constant input)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain = []
    for node in scoped:
        if node.op_type not in ("Mul", "Add", "Sub", "Div") or len(node.input) != 2:
            raise ValueError(f"BN layer {layer!r} exported as {node.op_type} ({node.name!r}); expected Mul/Add/Sub/Div")
        is_const = [name in constants for name in node.input]
        if is_const.count(True) != 1:
            raise ValueError(f"node {node.name!r} of BN layer {layer!r} needs exactly one constant operand")
        x_index = is_const.index(False)
        if chain:
            previous = chain[-1][0].output[0]
            if node.input[x_index] != previous or len(consumers.get(previous, [])) != 1:
                raise ValueError(f"BN layer {layer!r}: its nodes do not form a single chain at {node.name!r}")
        chain.append((node, x_index))
    return chain


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Inferred shape of every value (int size, symbolic name, or None if unknown)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def _consumers(graph: onnx.GraphProto, value: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if value in n.input]


def _check_affine(layer: BatchNormParams, scale: np.ndarray, shift: np.ndarray, rtol: float) -> None:
    want_scale, want_shift = layer.affine()
    beta, mean = (np.asarray(a, np.float64).reshape(-1) for a in (layer.beta, layer.mean))
    # shift = beta - mean * scale loses digits to cancellation: bound by the magnitudes that enter it.
    shift_tol = rtol * (np.abs(beta) + np.abs(mean * want_scale)) + 1e-30
    scale_ok = np.all(np.abs(scale - want_scale) <= rtol * np.abs(want_scale) + 1e-30)
    if not (scale_ok and np.all(np.abs(shift - want_shift) <= shift_tol)):
        raise ValueError(
            f"BN layer {layer.name!r}: exported affine map differs from gamma/sqrt(var+eps), beta-mean*scale "
            f"(max |d scale| {np.max(np.abs(scale - want_scale)):.3g}, max |d shift| "
            f"{np.max(np.abs(shift - want_shift)):.3g}); the weights do not belong to this export"
        )


def _batchnorm_node(graph: onnx.GraphProto, layer: BatchNormParams, x_name: str, y_name: str) -> onnx.NodeProto:
    """The layer's ``BatchNormalization`` node x_name -> y_name; its gamma/beta/mean/var go into ``graph``."""
    return helper.make_node(
        "BatchNormalization",
        [x_name, *_add_bn_initializers(graph, layer)],
        [y_name],
        name=layer.name,
        epsilon=float(layer.epsilon),
    )


def _add_bn_initializers(graph: onnx.GraphProto, layer: BatchNormParams) -> list[str]:
    names = []
    for role, value in zip(("scale", "bias", "mean", "var"), layer.arrays(), strict=True):
        names.append(f"{layer.name}.{role}")
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(-1), names[-1]))
    return names


def _replace_affine_chain(graph, scoped, layer: BatchNormParams, constants, shapes, rtol: float) -> None:
    """Keras' own layer: tf2onnx leaves y = x * (gamma/sqrt(var+eps)) + (beta - mean*scale) as Mul/Add."""
    chain = _find_chain(graph, scoped, layer.name, constants)
    first, x_index = chain[0]
    x_name, y_name = first.input[x_index], chain[-1][0].output[0]
    if x_name not in shapes:
        raise ValueError(f"BN layer {layer.name!r}: shape inference gave no rank for its input {x_name!r}")
    scale, shift = _compose_chain(chain, constants, len(shapes[x_name]), layer.channels)
    _check_affine(layer, scale, shift, rtol)
    bn = _batchnorm_node(graph, layer, x_name, y_name)
    position = list(graph.node).index(first)
    for node, _ in chain:
        graph.node.remove(node)
    graph.node.insert(position, bn)


def _adopt_batchnorm(graph, bn: onnx.NodeProto, layer: BatchNormParams, constants, shapes) -> None:
    """keras_bn.BatchNorm: TF's fused kernel already became a BatchNormalization node; check and tidy it.

    Its four parameters must be the layer's own values (bit for bit: they are the same float32
    variables). A 2-D input reaches the kernel as (N, C, 1, 1) between two Reshapes; BN on (N, C)
    is the same operation, so the Reshapes go and the node sees the Dense output directly, which
    is what lets :func:`export.onnx.fold.fold_batchnorm` find the MatMul before it.
    """
    for value, name in zip(layer.arrays(), bn.input[1:5], strict=True):
        got = constants.get(name)
        if got is None or not np.array_equal(got.reshape(-1), np.asarray(value, np.float32).reshape(-1)):
            raise ValueError(f"BN layer {layer.name!r}: node {bn.name!r} input {name!r} is not the layer's weight")
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    if np.float32(eps) != np.float32(layer.epsilon):
        raise ValueError(f"BN layer {layer.name!r}: node epsilon {eps} differs from the layer's {layer.epsilon}")
    bn.name = layer.name
    bn.input[1:5] = _add_bn_initializers(graph, layer)
    into, users = bn.input[0], _consumers(graph, bn.output[0])
    before = next((n for n in graph.node if into in n.output), None)
    if before is None or before.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
        return
    source, after = before.input[0], users[0]
    target = constants.get(before.input[1])
    as_4d = target is not None and target.tolist() in ([-1, layer.channels, 1, 1], [0, layer.channels, 1, 1])
    back_2d = [len(shapes.get(v, [])) == 2 and shapes[v][1] == layer.channels for v in (source, after.output[0])]
    if as_4d and all(back_2d):
        bn.input[0], bn.output[0] = source, after.output[0]
        graph.node.remove(after)  # `before` is dropped as dead code once nothing reads it


def _folded_conv(graph, scoped, layer: BatchNormParams) -> onnx.NodeProto | None:
    """The Conv tf2onnx folded this BN into, if it did: no BN or affine node of the layer is left, and
    one Conv is named in the layer's scope, writes a value named in it (``<layer>/FusedBatchNormV3:0``)
    or reads a folded weight named in it (``<layer>/batchnorm/sub:0``, the shift as the Conv's bias).

    tf2onnx folds BN into a Conv whose output reaches the BN directly once its transpose optimizer has
    moved the NCHW->NHWC Transpose past the BN: that happens when Flatten (or the graph output), not
    ReLU/pooling, follows the BN.
    """
    if any(n.op_type in ("BatchNormalization", "Mul", "Add", "Sub", "Div") for n in scoped):
        return None
    in_scope = re.compile(rf"(.*/)?{re.escape(layer.name)}(_\d+)?/.*")

    def names_layer(conv: onnx.NodeProto) -> bool:  # by its name, output or folded weights' names
        return any(in_scope.fullmatch(v) for v in (conv.name, conv.output[0], *conv.input[1:]))

    convs = [n for n in graph.node if n.op_type == "Conv" and names_layer(n)]
    return convs[0] if len(convs) == 1 else None


def _unfold_conv(graph, conv: onnx.NodeProto, layer: BatchNormParams, constants, rtol: float) -> None:
    """Put the layer's own Conv weights back into ``conv`` and a BatchNormalization node after it.

    Checked first: the exporter's weights must be W * s and (b - mean) * s + beta of this layer's
    Conv and BN within ``rtol`` (the exporter folds in float32), else the weights belong elsewhere.
    """
    if layer.producer is None:
        raise ValueError(
            f"BN layer {layer.name!r} was folded by the exporter into Conv {conv.name!r}, and the Conv's own "
            "weights are not known (BatchNormParams.producer), so the BN cannot be restored"
        )
    weight, bias = (np.asarray(a, np.float64) if a is not None else None for a in layer.producer)
    bias = np.zeros(layer.channels) if bias is None else bias.reshape(-1)
    folded_w = constants.get(conv.input[1])
    folded_b = constants.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(layer.channels)
    if folded_w is None or folded_b is None or folded_w.shape != weight.shape:
        raise ValueError(f"BN layer {layer.name!r}: Conv {conv.name!r} has no constant weight of shape {weight.shape}")
    scale, shift = layer.affine()
    channel = (-1,) + (1,) * (weight.ndim - 1)
    want_w, want_b = weight * scale.reshape(channel), bias * scale + shift
    mean, beta = (np.abs(np.asarray(a, np.float64).reshape(-1)) for a in (layer.mean, layer.beta))
    b_tol = rtol * ((np.abs(bias) + mean) * np.abs(scale) + beta) + 1e-30
    w_ok = np.all(np.abs(folded_w - want_w) <= rtol * np.abs(want_w) + 1e-30)
    if not (w_ok and np.all(np.abs(folded_b.reshape(-1) - want_b) <= b_tol)):
        raise ValueError(
            f"BN layer {layer.name!r}: Conv {conv.name!r} weights are not this layer's Conv folded with its "
            "statistics; the weights do not belong to this export"
        )
    names = {i.name for i in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
    w_name, b_name, z_name = (f"{layer.name}.conv.{role}" for role in ("weight", "bias", "input"))
    if names & {w_name, b_name, z_name}:
        raise ValueError(f"BN layer {layer.name!r}: the graph already uses the names {sorted(names & {w_name})}")
    graph.initializer.append(numpy_helper.from_array(np.asarray(layer.producer[0], np.float32), w_name))
    graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
    y_name = conv.output[0]
    conv.input[1:] = [w_name, b_name]
    conv.output[0] = z_name
    bn = _batchnorm_node(graph, layer, z_name, y_name)
    graph.node.insert(list(graph.node).index(conv) + 1, bn)


def restore_batchnorm(
    model: onnx.ModelProto, layers: Sequence[BatchNormParams], *, rtol: float = 1e-5
) -> onnx.ModelProto:
    """Give every Keras BN layer in a tf2onnx export one ``BatchNormalization`` node with its real statistics.

    The layer's nodes are found by its TF name scope. Two shapes occur:

    - Keras' built-in layer exports as a chain x -> ... -> y of elementwise ops with per-channel
      constants, y = s * x + t. We check s == gamma / sqrt(var + eps) and t == beta - mean * s
      within ``rtol`` (TF folded them in float32: a few ulp, ~1e-7 relative; 1e-5 still rejects
      any other layer's statistics) and replace the chain by the node.
    - ``keras_bn.BatchNorm`` runs TF's fused kernel, which tf2onnx already maps to the node; we
      check that its inputs are the layer's weights and remove the (N, C) <-> (N, C, 1, 1)
      Reshapes around it for Dense inputs.
    - Either layer right after a Conv and before Flatten: tf2onnx folds it into the Conv itself.
      With the Conv's weights in ``layer.producer`` we check the fold and undo it (the Conv gets its
      own weights back, the node follows it).

    Initializers are renamed ``<layer>.scale/.bias/.mean/.var`` and nodes ``<layer>``. Returns a
    new model; ``model`` is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = _constants(graph)
    shapes = _shapes(out)
    for layer in layers:
        scoped = [n for n in graph.node if _in_scope(n, layer.name)]
        if not scoped:
            raise ValueError(f"no node of BN layer {layer.name!r} in the export (was it folded away by the exporter?)")
        nodes = [n for n in scoped if n.op_type == "BatchNormalization"]
        if len(nodes) > 1:
            raise ValueError(f"BN layer {layer.name!r} exported as {len(nodes)} BatchNormalization nodes")
        folded_into = None if nodes else _folded_conv(graph, scoped, layer)
        if nodes:
            _adopt_batchnorm(graph, nodes[0], layer, constants, shapes)
        elif folded_into is not None:
            _unfold_conv(graph, folded_into, layer, constants, rtol)
        else:
            _replace_affine_chain(graph, scoped, layer, constants, shapes, rtol)
    _drop_unused(graph)
    return out


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (all ONNX ops we meet are pure), then unused initializers."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---------------------------------------------------------------------------------------------
# Training-mode BatchNormalization


def batchnorm_training_model(
    x_shape: Sequence[int], *, epsilon: float = 1e-5, momentum: float = 0.9, dtype=np.float32
) -> onnx.ModelProto:
    """One ``BatchNormalization`` node (opset 15, ``training_mode=1``) with all five inputs as graph inputs.

    Outputs ``Y``, ``running_mean``, ``running_var``. By the operator's definition (ONNX
    Operators.md, BatchNormalization-15):

        current_mean = ReduceMean(X, axes=all but 1),  current_var = ReduceVar(X) (biased)
        Y = (X - current_mean) / sqrt(current_var + epsilon) * scale + B
        running_mean = input_mean * momentum + current_mean * (1 - momentum)   (same for var)

    i.e. ``spec.batch_norm_train`` plus ``spec.update_running_stats(convention="onnx")``.
    """
    shape = [int(d) for d in x_shape]
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"x_shape must be (N, C, ...) with positive sizes, got {tuple(x_shape)}")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    channels = [shape[1]]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        ["Y", "running_mean", "running_var"],
        epsilon=float(epsilon),
        momentum=float(momentum),
        training_mode=1,
    )
    graph = helper.make_graph(
        [node],
        "batchnorm_training",
        [
            helper.make_tensor_value_info("X", elem, shape),
            *(helper.make_tensor_value_info(n, elem, channels) for n in ("scale", "B", "input_mean", "input_var")),
        ],
        [
            helper.make_tensor_value_info("Y", elem, shape),
            helper.make_tensor_value_info("running_mean", elem, channels),
            helper.make_tensor_value_info("running_var", elem, channels),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TRAINING_OPSET)])
    return finalize(
        model, {"model": "batchnorm_training", "convention": "onnx", "framework": "onnx", "bn_form": "training"}
    )
