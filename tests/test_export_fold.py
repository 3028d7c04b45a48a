"""BN folding (export.onnx.fold): the formula against the spec, every graph pattern, and the exporters' own folds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _export_models import FLAVOURS, exported, raw_keras_export
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import spec
from export.onnx.fold import fold_batchnorm, fold_weights
from export.onnx.graph import BatchNormParams, batchnorm_nodes, check_model

U32 = 2.0**-24  # float32 unit roundoff


def _bn_params(rng: np.random.Generator, channels: int, eps: float = 1e-3) -> BatchNormParams:
    """Statistics far from the identity (mean ~ +-3, var in [0.05, 4]) so a dropped term shows."""
    return BatchNormParams(
        name="bn",
        gamma=rng.uniform(0.3, 2.0, channels).astype(np.float32),
        beta=rng.normal(0, 1, channels).astype(np.float32),
        mean=rng.normal(0, 3, channels).astype(np.float32),
        var=rng.uniform(0.05, 4.0, channels).astype(np.float32),
        epsilon=eps,
    )


def _conv_nchw(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))  # (N, C, H', W', kh, kw)
    return np.einsum("nchwij,ocij->nohw", windows, w)


LINEAR = {
    # name: (weight shape, out_axis, x shape, y = f(x, W) without bias, channel axis of y)
    "conv": ((5, 3, 3, 3), 0, (4, 3, 7, 7), _conv_nchw, 1),
    "gemm-transB1": ((6, 8), 0, (9, 8), lambda x, w: x @ w.T, 1),
    "matmul": ((8, 6), 1, (9, 8), lambda x, w: x @ w, 1),
}


@pytest.mark.parametrize("kind", list(LINEAR))
def test_fold_weights_equals_linear_then_spec_batch_norm_infer(kind, rng):
    w_shape, out_axis, x_shape, linear, axis = LINEAR[kind]
    channels = w_shape[out_axis]
    w = rng.normal(0, 1, w_shape).astype(np.float32)
    b = rng.normal(0, 1, channels).astype(np.float32)
    x = rng.normal(0, 1, x_shape)
    bn = _bn_params(rng, channels)
    shape = [1] * (len(x_shape)) if kind == "conv" else [1, -1]
    if kind == "conv":
        shape[1] = -1
    z = linear(x, w.astype(np.float64)) + b.reshape(shape)
    expected = spec.batch_norm_infer(z, bn.gamma, bn.beta, bn.mean, bn.var, axis=axis, eps=np.float32(bn.epsilon))
    w2, b2 = fold_weights(w, b, bn, out_axis=out_axis)
    assert w2.dtype == b2.dtype == np.float32
    got = linear(x, w2.astype(np.float64)) + b2.astype(np.float64).reshape(shape)
    # Only W' and b' were rounded (half an ulp each), so |got - expected| <= u * (|x| @ |W'| + |b'|); 2u for slack.
    bound = 2 * U32 * (linear(np.abs(x), np.abs(w2.astype(np.float64))) + np.abs(b2).reshape(shape))
    assert np.all(np.abs(got - expected) <= bound)


def _bn_initializers(bn: BatchNormParams) -> list[onnx.TensorProto]:
    names = ("g", "be", "m", "v")
    return [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn.arrays(), strict=True)]


def _graph_with_bn(kind: str, rng: np.random.Generator):
    """A one-linear-op-then-BN graph for each pattern the pass folds, and its float32 input."""
    inits = _bn_initializers(_bn_params(rng, 6))
    if kind.startswith("conv"):
        x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32), "W"))
        inputs = ["x", "W"]
        if kind == "conv-bias":
            inits.append(numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "b"))
            inputs.append("b")
        nodes = [helper.make_node("Conv", inputs, ["z"], name="lin")]
    else:
        x = rng.normal(0, 1, (5, 4)).astype(np.float32)
        if kind.startswith("gemm"):
            trans_b = int(kind.endswith("transB1"))
            w = rng.normal(0, 1, (6, 4) if trans_b else (4, 6)).astype(np.float32)
            inits += [
                numpy_helper.from_array(w, "W"),
                numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "b"),
            ]
            nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="lin", transB=trans_b, alpha=1.5, beta=0.5)]
        else:
            inits.append(numpy_helper.from_array(rng.normal(0, 1, (4, 6)).astype(np.float32), "W"))
            nodes = [helper.make_node("MatMul", ["x", "W"], ["z" if kind == "matmul" else "p"], name="lin")]
            if kind == "matmul-add":
                inits.append(numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "b"))
                nodes.append(helper.make_node("Add", ["p", "b"], ["z"], name="bias"))
    nodes.append(helper.make_node("BatchNormalization", ["z", "g", "be", "m", "v"], ["y"], name="bn", epsilon=1e-3))
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *x.shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 4, 4] if x.ndim == 4 else [None, 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model, x


PATTERNS = ["conv-bias", "conv-nobias", "gemm-transB1", "gemm-transB0", "matmul-add", "matmul"]


@pytest.mark.parametrize("kind", PATTERNS)
def test_fold_pattern_gives_the_unfolded_output(kind, rng):
    model, x = _graph_with_bn(kind, rng)
    folded = fold_batchnorm(model)
    check_model(folded)
    assert not batchnorm_nodes(folded)
    assert len(folded.graph.node) == len(model.graph.node) - 1 + (kind == "matmul")  # MatMul gains an Add
    # Ground truth in float64: the unfolded graph evaluated with double initializers and input.
    double = onnx.ModelProto()
    double.CopyFrom(model)
    for init in double.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    double.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    double.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    expected = ReferenceEvaluator(double).run(None, {"x": x.astype(np.float64)})[0]
    (got,) = ReferenceEvaluator(folded).run(None, {"x": x})
    # float32 sums of <= 27 products of O(1) values, scaled by BN factors up to ~9: ~1e-6 of the output scale.
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def _linear_params(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(op, weight, bias) of each Conv/Gemm in graph order."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    return [(n.op_type, inits[n.input[1]], inits[n.input[2]]) for n in ops]


def _batchnorms(model: onnx.ModelProto) -> list[BatchNormParams]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    eps = [next(a.f for a in n.attribute if a.name == "epsilon") for n in batchnorm_nodes(model)]
    return [
        BatchNormParams(n.name, *(inits[v] for v in n.input[1:5]), epsilon=e)
        for n, e in zip(batchnorm_nodes(model), eps, strict=True)
    ]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_our_fold_matches_torch_exporter_fold(flavour):
    unfolded = onnx.load(exported(flavour)["torch"])
    ours = _linear_params(fold_batchnorm(unfolded))
    theirs = _linear_params(onnx.load(exported(flavour)["torch-folded"]))
    assert [op for op, *_ in ours] == [op for op, *_ in theirs] == ["Conv", "Conv", "Gemm", "Gemm", "Gemm"]
    for (_, w_ours, _), (_, w_theirs, _) in zip(ours, theirs, strict=True):
        # onnxscript folds in float32: s = gamma/sqrt(var+eps) and W*s each round, a few ulp from our one rounding.
        np.testing.assert_allclose(w_ours, w_theirs, rtol=8 * U32, atol=0)
    # b' = (b - mean) * s + beta cancels, so its bound scales with the magnitudes entering it (4 BN layers, fc3 none)
    bns = _batchnorms(unfolded)
    for (_, _, b_ours), (_, _, b_theirs), (_, _, b), bn in zip(
        ours, theirs, _linear_params(unfolded), bns, strict=False
    ):
        scale, _ = bn.affine()
        magnitude = (np.abs(b) + np.abs(bn.mean)) * np.abs(scale) + np.abs(bn.beta)
        assert np.all(np.abs(b_ours.astype(np.float64) - b_theirs) <= 8 * U32 * magnitude)
    np.testing.assert_array_equal(ours[-1][1], theirs[-1][1])  # fc3 has no BN: untouched


def _affine_after(model: onnx.ModelProto, node: onnx.NodeProto):
    """tf2onnx's Mul(c1)/Add(c2) after a Conv, or after a MatMul's bias Add: (bias, c1, c2)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def consumer(value):
        return next(n for n in model.graph.node if value in n.input)

    if node.op_type == "Conv":
        bias, out = inits[node.input[2]], node.output[0]
    else:
        add = consumer(node.output[0])
        bias, out = inits[next(v for v in add.input if v in inits)], add.output[0]
    mul = consumer(out)
    add = consumer(mul.output[0])
    assert (mul.op_type, add.op_type) == ("Mul", "Add")
    c1 = next(inits[v] for v in mul.input if v in inits).reshape(-1)
    c2 = next(inits[v] for v in add.input if v in inits).reshape(-1)
    return bias, c1, c2


def test_our_fold_matches_tf2onnx_affine_constants():
    """keras.layers.BatchNormalization: TF's own float32 scale/shift, applied to W and b, equal our fold."""
    raw = raw_keras_export("builtin")
    folded = onnx.load(exported("builtin")["keras-folded"])
    raw_inits = {i.name: numpy_helper.to_array(i) for i in raw.graph.initializer}
    folded_inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    raw_ops = [n for n in raw.graph.node if n.op_type in ("Conv", "MatMul")][:4]  # fc3 has no BN
    folded_ops = [n for n in folded.graph.node if n.op_type in ("Conv", "MatMul")][:4]
    for raw_op, ours in zip(raw_ops, folded_ops, strict=True):
        bias, c1, c2 = _affine_after(raw, raw_op)
        w = raw_inits[raw_op.input[1]].astype(np.float64)
        axis = 0 if raw_op.op_type == "Conv" else 1
        shape = [1] * w.ndim
        shape[axis] = -1
        w_ours = folded_inits[ours.input[1]]
        # c1 = gamma * rsqrt(var + eps) rounded by TF in float32 (~2 ulp); W' adds its own half ulp.
        np.testing.assert_allclose(w_ours, w * c1.reshape(shape), rtol=8 * U32, atol=0)
        if ours.op_type == "Conv":
            b_ours = folded_inits[ours.input[2]]
        else:
            add = next(n for n in folded.graph.node if ours.output[0] in n.input)
            b_ours = folded_inits[next(v for v in add.input if v in folded_inits)]
        # c2 = beta - mean * c1 carries TF's float32 cancellation error: bound by the terms' magnitudes
        expected = bias.astype(np.float64) * c1 + c2
        magnitude = np.abs(bias * c1) + np.abs(c2) + 1.0
        assert np.all(np.abs(b_ours - expected) <= 16 * U32 * magnitude)


def test_fold_refuses_a_bn_with_nothing_to_fold_into(rng):
    inits = _bn_initializers(_bn_params(rng, 3))
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("BatchNormalization", ["r", "g", "be", "m", "v"], ["y"], name="bn_after_relu"),
        ],
        "relu_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match="bn_after_relu.*Relu"):
        fold_batchnorm(model)
    assert len(batchnorm_nodes(fold_batchnorm(model, strict=False))) == 1
