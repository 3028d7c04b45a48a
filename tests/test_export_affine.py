"""BN with nothing to fold into (after a Concat, after an Add) becomes its affine map in the folded ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from numerics import close, tolerance
from onnx import TensorProto, helper, numpy_helper

from export.onnx.fold import affine_batchnorm
from export.onnx.graph import batchnorm_nodes, metadata

U32 = 2.0**-24  # float32 unit roundoff


def _bn_stats(module, rng: np.random.Generator) -> None:
    """Statistics far from the identity (mean ~ +-2, var in [0.1, 4]) so a dropped term shows."""
    import torch

    channels = module.num_features
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(rng.uniform(0.3, 2.0, channels).astype(np.float32)))
        module.bias.copy_(torch.from_numpy(rng.normal(0, 1, channels).astype(np.float32)))
        module.running_mean.copy_(torch.from_numpy(rng.normal(0, 2, channels).astype(np.float32)))
        module.running_var.copy_(torch.from_numpy(rng.uniform(0.1, 4.0, channels).astype(np.float32)))


def _concat_add_net(rng: np.random.Generator):
    """Conv->BN (foldable), then a BN after a Concat and a BN after an Add (DenseNet / ResNet-v2 patterns)."""
    import torch
    from torch import nn

    class ConcatAddNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.stem_bn = nn.BatchNorm2d(4)
            self.branch = nn.Conv2d(4, 4, 3, padding=1)
            self.concat_bn = nn.BatchNorm2d(8, eps=1.001e-5)  # keras.applications' DenseNet eps
            self.widen = nn.Conv2d(8, 8, 1)
            self.add_bn = nn.BatchNorm2d(8, eps=1e-3)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem(x)))
            x = torch.relu(self.concat_bn(torch.cat([x, self.branch(x)], dim=1)))
            x = torch.relu(self.add_bn(x + self.widen(x)))
            return self.head(x.mean(dim=(2, 3)))

    net = ConcatAddNet()
    for module in (net.stem_bn, net.concat_bn, net.add_bn):
        _bn_stats(module, rng)
    return net.eval()


@pytest.fixture(scope="module")
def concat_add_export(tmp_path_factory):
    from export.onnx.exporters import export_torch

    net = _concat_add_net(np.random.default_rng(20261130))
    out = tmp_path_factory.mktemp("affine")
    files = {fold: export_torch(net, out / f"{fold}.onnx", fold=fold, input_shape=(3, 8, 8)) for fold in (False, True)}
    return net, files


def test_torch_folded_graph_writes_unfoldable_bn_as_mul_add(concat_add_export):
    _, files = concat_add_export
    kept, folded = onnx.load(files[False]), onnx.load(files[True])
    assert len(batchnorm_nodes(kept)) == 3
    assert batchnorm_nodes(folded) == []
    ops = [n.op_type for n in folded.graph.node]
    # stem_bn went into the stem Conv; concat_bn and add_bn are one Mul then one Add each.
    pairs = [
        (a, b)
        for a, b in zip(folded.graph.node, folded.graph.node[1:], strict=False)
        if (a.op_type, b.op_type) == ("Mul", "Add")
    ]
    assert len(pairs) == ops.count("Mul") == 2
    assert all(b.input[0] == a.output[0] for a, b in pairs)
    props = metadata(folded)
    assert (props["bn_folded_into_producer"], props["bn_affine_map"]) == ("1", "2")
    assert "affine_batchnorm" in props["bn_folded_by"]


def test_ort_on_kept_and_folded_agrees_with_torch_eval(concat_add_export, rng):
    import torch

    from export.runtimes import run_ort

    net, files = concat_add_export
    images = rng.uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)  # NHWC, as run_ort takes them
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    # float32 on every side, each with its own op order (BN as one op, folded into a Conv, or Mul/Add):
    # cross-framework float32 bound relative to the logits' scale, as tests/test_export_onnx.py does.
    bound = tolerance("cross-framework", "float32")
    for fold, path in files.items():
        close(run_ort(path, images), expected, bound, what=f"ort {'folded' if fold else 'kept'}", scale="magnitude")


def _single_bn_model(params: dict[str, np.ndarray], eps: float, rank: int) -> onnx.ModelProto:
    channels = params["gamma"].size
    shape = ["N", channels, *([3] * (rank - 2))]
    node = helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=eps)
    graph = helper.make_graph(
        [node],
        "one_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("rank", [2, 4], ids=["NC", "NCHW"])
def test_affine_constants_are_the_hand_computed_float64_map(rank, rng):
    channels, eps = 6, 1e-3
    params = {
        "gamma": rng.uniform(0.3, 2.0, channels).astype(np.float32),
        "beta": rng.normal(0, 1, channels).astype(np.float32),
        "mean": rng.normal(0, 3, channels).astype(np.float32),
        "var": rng.uniform(0.05, 4.0, channels).astype(np.float32),
    }
    model = affine_batchnorm(_single_bn_model(params, eps, rank))
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale, shift = inits[model.graph.node[0].input[1]], inits[model.graph.node[1].input[1]]
    assert scale.shape == shift.shape == (channels, *([1] * (rank - 2)))
    assert scale.dtype == shift.dtype == np.float32
    gamma, beta, mean, var = (params[k].astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    # Hand-computed in float64 (eps rounded to float32, as the ONNX attribute stores it).
    want_scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
    want_shift = beta - mean * want_scale
    # One rounding to float32: half an ulp of each value; the shift's bound scales with the terms it cancels.
    assert np.all(np.abs(scale.reshape(-1) - want_scale) <= U32 * np.abs(want_scale))
    assert np.all(np.abs(shift.reshape(-1) - want_shift) <= U32 * (np.abs(beta) + np.abs(mean * want_scale)))


def test_affine_refuses_training_mode_bn_by_name(rng):
    params = {k: np.ones(4, np.float32) for k in ("gamma", "beta", "mean", "var")}
    model = _single_bn_model(params, 1e-5, 4)
    model.graph.node[0].attribute.append(helper.make_attribute("training_mode", 1))
    with pytest.raises(ValueError, match="BatchNormalization 'bn' is in training mode"):
        affine_batchnorm(model)


def test_keras_folded_graph_writes_bn_after_concatenate_as_mul_add(rng, tmp_path):
    """The Keras path (tf2onnx, then our fold) has the same limit: a BN after Concatenate has no Conv to fold into."""
    import keras

    from export.onnx.exporters import export_keras
    from export.runtimes import run_ort

    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(1))(images)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(2))(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, name="bn_concat")(keras.layers.Concatenate()([x, y]))
    logits = keras.layers.Dense(5, kernel_initializer=keras.initializers.GlorotUniform(3))(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    model = keras.Model(images, logits)
    for name in ("bn_conv", "bn_concat"):
        layer = model.get_layer(name)
        c = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.3, 2, c), rng.normal(0, 1, c), rng.normal(0, 2, c), rng.uniform(0.1, 4, c)])
    x_test = rng.uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    expected = model.predict(x_test, verbose=0)
    folded_path = export_keras(model, tmp_path / "folded.onnx", fold=True)
    folded = onnx.load(folded_path)
    assert batchnorm_nodes(folded) == []
    props = metadata(folded)
    assert (props["bn_folded_into_producer"], props["bn_affine_map"]) == ("1", "1")
    close(run_ort(folded_path, x_test), expected, tolerance("cross-framework", "float32"), scale="magnitude")
