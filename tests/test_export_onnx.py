"""ONNX exports of LeNet-BN: validity, BN form, names, dynamic batch, metadata, BN restoration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _export_models import FLAVOURS, digits, exported, raw_keras_export, trained_pair
from numerics import close, tolerance

from export.onnx.exporters import FORMS, keras_batchnorm_params
from export.onnx.graph import (
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
    from export.onnx.exporters import export_keras

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
    close(logits, expected, tolerance("summation-order", "float32"), scale="magnitude", what="logits")


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


def _conv_bn_flatten(batch_norm: str, rng: np.random.Generator):
    """Conv2D -> BN -> Flatten with statistics far from the identity: tf2onnx folds this BN into the Conv."""
    import keras

    import keras_bn

    layer = keras_bn.BatchNorm(name="bn") if batch_norm == "ours" else keras.layers.BatchNormalization(name="bn")
    inputs = keras.Input((10, 10, 1))
    outputs = keras.layers.Flatten(name="flat")(layer(keras.layers.Conv2D(4, 3, name="conv")(inputs)))
    model = keras.Model(inputs, outputs, name=f"conv_bn_flatten_{batch_norm}")
    conv = model.get_layer("conv")
    conv.set_weights([rng.normal(0, 0.5, (3, 3, 1, 4)).astype(np.float32), np.zeros(4, np.float32)])
    stats = [rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4), rng.normal(0, 2, 4), rng.uniform(0.2, 3, 4)]
    layer.set_weights([s.astype(np.float32) for s in stats])  # gamma, beta, moving mean, moving variance
    return model


@pytest.mark.parametrize("fold", [False, True], ids=["bn-kept", "bn-folded"])
@pytest.mark.parametrize("batch_norm", ["ours", "keras"], ids=["keras_bn.BatchNorm", "keras.BatchNormalization"])
def test_conv_bn_flatten_exports_with_bn_kept_or_folded(batch_norm, fold, rng, tmp_path):
    from export.onnx.exporters import export_keras
    from export.runtimes import run_ort, run_spec

    model = _conv_bn_flatten(batch_norm, rng)
    exported_model = onnx.load(export_keras(model, tmp_path / "m.onnx", fold=fold))
    nodes = batchnorm_nodes(exported_model)
    assert len(nodes) == (0 if fold else 1)
    if not fold:  # the Conv has its own weights back (tf2onnx had folded the BN into them)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in exported_model.graph.initializer}
        conv = next(n for n in exported_model.graph.node if n.op_type == "Conv")
        kernel, bias = model.get_layer("conv").get_weights()
        np.testing.assert_array_equal(inits[conv.input[1]], kernel.transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(inits[conv.input[2]], bias)
        assert nodes[0].input[0] == conv.output[0]
    x = rng.uniform(0, 1, (16, 10, 10, 1)).astype(np.float32)
    expected = run_spec(model, x)  # float64, BN by spec.batch_norm_infer
    got = run_ort(tmp_path / "m.onnx", x)
    # float32 sums of 9 products, BN scale up to ~4: re-association error ~1e-6 of the output scale; 1e-5 bound.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_restore_refuses_a_conv_fold_with_other_weights(rng, tmp_path):
    """An exporter-folded Conv is only unfolded when its weights are this layer's Conv folded with this BN."""
    import tensorflow as tf

    model = _conv_bn_flatten("keras", rng)
    signature = [tf.TensorSpec((None, 10, 10, 1), tf.float32, name="images")]
    path = tmp_path / "raw.onnx"
    model.export(str(path), format="onnx", verbose=False, input_signature=signature, opset_version=OPSET)
    raw = onnx.load(path)
    assert [n.op_type for n in raw.graph.node if n.op_type in ("Conv", "Mul", "Add", "BatchNormalization")] == ["Conv"]
    (params,) = keras_batchnorm_params(model)
    weight, bias = params.producer
    wrong = BatchNormParams(**{**params.__dict__, "producer": (weight * 1.001, bias)})
    with pytest.raises(ValueError, match="'bn'.*not this layer's Conv folded"):
        restore_batchnorm(raw, [wrong])
    unknown = BatchNormParams(**{**params.__dict__, "producer": None})
    with pytest.raises(ValueError, match="'bn' was folded by the exporter into Conv"):
        restore_batchnorm(raw, [unknown])
