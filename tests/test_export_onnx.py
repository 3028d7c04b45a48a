"""ONNX exports of LeNet-BN: validity, BN form, names, dynamic batch, metadata, BN restoration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _export_models import FLAVOURS, digits, exported, raw_keras_export, trained_pair

from export.onnx_export import FORMS, keras_batchnorm_params
from export.onnx_graph import (
    BATCH_DIM,
    OPSET,
    BatchNormParams,
    batchnorm_nodes,
    check_model,
    ir_version_for,
    metadata,
    restore_batchnorm,
)
from export.runtimes import ort_session, run_keras

CASES = [(flavour, form) for flavour in FLAVOURS for form in FORMS]
IDS = [f"{flavour}-{form}" for flavour, form in CASES]


def _load(flavour: str, form: str) -> onnx.ModelProto:
    return onnx.load(exported(flavour)[form])


@pytest.mark.parametrize(("flavour", "form"), CASES, ids=IDS)
def test_export_passes_checker_and_strict_shape_inference(flavour, form):
    model = _load(flavour, form)
    inferred = check_model(model)  # raises on any checker or inference error
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET >= 15
    # IR 8 is the minimum for opset 18: every runtime implementing opset 18 loads it (onnxruntime < 1.32 refuses
    # onnx >= 1.23's default IR 14).
    assert model.ir_version == ir_version_for(model) == 8
    logits = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in logits] == [BATCH_DIM, 10]


@pytest.mark.parametrize(("flavour", "form"), CASES, ids=IDS)
def test_export_has_bn_nodes_only_when_unfolded(flavour, form):
    model = _load(flavour, form)
    ops = [n.op_type for n in model.graph.node]
    if form.endswith("folded"):
        assert "BatchNormalization" not in ops
        # each BN went into its Conv or dense op: two convolutions and three dense layers remain
        assert ops.count("Conv") == 2
        assert ops.count("Gemm") + ops.count("MatMul") == 3
    else:
        nodes = batchnorm_nodes(model)
        assert len(nodes) == 4
        assert all(not any(a.name == "training_mode" and a.i for a in n.attribute) for n in nodes)
        if form == "keras":
            assert [n.name for n in nodes] == ["bn1", "bn2", "bn3", "bn4"]


@pytest.mark.parametrize(("flavour", "form"), CASES, ids=IDS)
def test_export_metadata_names_model_convention_framework(flavour, form):
    props = metadata(_load(flavour, form))
    keras_model, _ = trained_pair(flavour)
    assert props["bn_form"] == ("folded" if form.endswith("folded") else "batchnorm")
    assert props["opset"] == str(OPSET)
    assert props["bn_layers"] == "bn1,bn2,bn3,bn4"
    # keras_to_torch carries epsilon over unchanged, so both sides record Keras' 1e-3
    assert props["bn_epsilon"] == ",".join(["0.001"] * 4)
    if form.startswith("keras"):
        assert props["model"] == keras_model.name
        assert props["framework"].startswith("keras ") and "tensorflow" in props["framework"]
        assert props["convention"] == "keras" and props["input_layout"] == "NHWC"
    else:
        assert props["framework"].startswith("torch ")
        assert props["convention"] == "torch" and props["input_layout"] == "NCHW"


@pytest.mark.parametrize(("batch_norm", "convention"), [("ours", "torch"), (None, "none")], ids=["ours-torch", "no-bn"])
def test_keras_export_metadata_follows_the_layers(batch_norm, convention, tmp_path):
    import keras_bn
    from export.onnx_export import export_keras

    model = keras_bn.lenet_bn(batch_norm, convention="torch", seed=0) if batch_norm else keras_bn.lenet_bn(None)
    props = metadata(onnx.load(export_keras(model, tmp_path / "m.onnx", fold=True)))
    assert props["convention"] == convention
    assert props["bn_form"] == ("folded" if batch_norm else "none")
    assert props["bn_layers"] == ("bn1,bn2,bn3,bn4" if batch_norm else "")


@pytest.mark.parametrize("batch", [1, 7], ids=["batch1", "batch7"])
@pytest.mark.parametrize(("flavour", "form"), CASES, ids=IDS)
def test_export_dynamic_batch_matches_keras(flavour, form, batch):
    images = digits()[0][:batch]
    model = _load(flavour, form)
    session = ort_session(exported(flavour)[form])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    feed = images if metadata(model)["input_layout"] == "NHWC" else images.transpose(0, 3, 1, 2)
    (logits,) = session.run(None, {"images": np.ascontiguousarray(feed)})
    expected = run_keras(trained_pair(flavour)[0], images)
    assert logits.shape == (batch, 10)
    # float32 re-association between TF and ORT kernels: ~1e-6 of the logit scale (see export.agreement.RTOL).
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_restore_batchnorm_rejects_statistics_of_another_model(flavour):
    raw = raw_keras_export(flavour)
    layers = keras_batchnorm_params(trained_pair(flavour)[0])
    # the untouched export restores fine with the model's own statistics ...
    restored = restore_batchnorm(raw, layers)
    assert [n.name for n in batchnorm_nodes(restored)] == ["bn1", "bn2", "bn3", "bn4"]
    # ... but moving_variance off by 1% in one channel of bn2 is caught (the check's rtol is 1e-5)
    var = layers[1].var.copy()
    var[3] *= 1.01
    wrong = [*layers[:1], BatchNormParams(**{**vars(layers[1]), "var": var}), *layers[2:]]
    with pytest.raises(ValueError, match="bn2"):
        restore_batchnorm(raw, wrong)


def test_exporter_decomposes_keras_batchnorm_which_restore_undoes():
    """Why restore exists: tf2onnx writes keras.layers.BatchNormalization as Mul/Add, no BN node."""
    raw = raw_keras_export("builtin")
    assert not batchnorm_nodes(raw)
    bn_scoped = [n.op_type for n in raw.graph.node if "/bn3_" in n.name]
    assert sorted(bn_scoped) == ["Add", "Mul"]


def test_our_ir_version_is_the_minimum_for_the_opset_and_loads_whatever_the_runtime_accepts_by_default():
    """onnx >= 1.23 stamps IR 14 on new models; onnxruntime < 1.32 refuses it, 1.32 loads it.

    So the claim that holds for every version pyproject admits is: we stamp the smallest IR that carries the opset
    (8 for opset 18), onnxruntime loads it, and with onnx's default IR a runtime either loads the model or refuses it
    by naming the IR version, never anything else.
    """
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert model.ir_version == onnx.IR_VERSION  # the default we replace
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime 1.31: "Unsupported model IR version: 14, max supported IR version: 13"
        assert "IR version" in str(error)
    model.ir_version = ir_version_for(model)
    assert model.ir_version == 8 <= onnx.IR_VERSION
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], [[0.0, 0.0, 2.0]])
