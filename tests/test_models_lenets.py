"""The d2l LeNet-BN and LeNet-5 in Keras and PyTorch: shapes, counts, resize, d2l moving averages, transfer, recipes.

Oracles: parameter counts written out by hand; PyTorch (a peer framework) for the resize and for the logits of the
Keras models after weight transfer; spec's d2l convention (through the Keras layer, an independent implementation)
for the from-scratch BN's moving averages; the float64 NumPy forward ``export.runtimes.run_spec``.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import torch
from numerics import close, tolerance

import keras_bn
import torch_ref
from export import recipes
from export.runtimes import run_spec
from keras_bn.model import BilinearResize
from torch_ref.model import D2LBatchNorm1d, D2LBatchNorm2d

MODELS = ["d2l-lenet-bn", "lenet5"]
#: (Keras batch_norm, torch batch_norm, extra torch kwargs) per flavour
FLAVOURS = {
    "ours": ("ours", "ours", {}),
    "framework": ("keras", "torch", {}),
    "no-bn": (None, None, {}),
}
BN_LAYERS = ("bn1", "bn2", "bn3", "bn4")

# Hand counts: a conv k x k, c_in -> c_out has k*k*c_in*c_out + c_out parameters, a dense n -> m has n*m + m.
_TRUNK_28 = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (16 * 4 * 4 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
_TRUNK_32 = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (16 * 5 * 5 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
_BN_AFFINE = 2 * (6 + 16 + 120 + 84)  # gamma and beta per channel of bn1..bn4; as many moving statistics x 2
assert (_TRUNK_28, _TRUNK_32, _BN_AFFINE) == (44_426, 61_706, 452)


def _keras(model: str, flavour: str, seed: int = 0, **kwargs) -> keras.Model:
    return keras_bn.model.BUILDERS[model](FLAVOURS[flavour][0], seed=seed, **kwargs)


def _torch(model: str, flavour: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    _, batch_norm, extra = FLAVOURS[flavour]
    return torch_ref.model.BUILDERS[model](batch_norm, seed=seed, **{**extra, **kwargs})


def _count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def _images(n: int = 8, side: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(n, side, side, 1)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _randomize_bn(model: keras.Model, seed: int) -> None:
    """Gamma, beta and moving statistics away from 1/0/0/1, so a swapped or dropped one shows in the logits."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name in BN_LAYERS:
            c = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c).astype(np.float32),
                    rng.normal(0.0, 0.3, c).astype(np.float32),
                    rng.normal(0.0, 0.5, c).astype(np.float32),
                    rng.uniform(0.2, 2.0, c).astype(np.float32),
                ]
            )


# --- structure ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "flavour", "params", "stats"),
    [
        ("d2l-lenet-bn", "ours", _TRUNK_28 + _BN_AFFINE, _BN_AFFINE),
        ("d2l-lenet-bn", "framework", _TRUNK_28 + _BN_AFFINE, _BN_AFFINE),
        ("d2l-lenet-bn", "no-bn", _TRUNK_28, 0),
        ("lenet5", "ours", _TRUNK_32 + _BN_AFFINE, _BN_AFFINE),
        ("lenet5", "framework", _TRUNK_32 + _BN_AFFINE, _BN_AFFINE),
        ("lenet5", "no-bn", _TRUNK_32, 0),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_parameter_counts_match_hand_count_in_both_frameworks(model, flavour, params, stats):
    k, t = _keras(model, flavour), _torch(model, flavour)
    assert (_count(k.trainable_weights), _count(k.non_trainable_weights)) == (params, stats)
    assert sum(p.numel() for p in t.parameters()) == params
    assert sum(b.numel() for b in t.buffers() if b.is_floating_point()) == stats


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("model", MODELS)
def test_layer_names_and_order_agree_across_frameworks(model, flavour):
    activation = "sigmoid" if model == "d2l-lenet-bn" else "tanh"
    expected = ["resize"] if model == "lenet5" else []
    for i, trunk in enumerate(["conv1", "conv2", "fc1", "fc2"], start=1):
        expected += [trunk, f"bn{i}", f"{activation}{i}"] + ([f"pool{i}"] if i <= 2 else [])
        expected += ["flatten"] if i == 2 else []
    expected.append("fc3")
    if flavour == "no-bn":
        expected = [n for n in expected if not n.startswith("bn")]
    assert [layer.name for layer in _keras(model, flavour).layers[1:]] == expected
    assert [name for name, _ in _torch(model, flavour).named_children()] == expected


def test_lenet5_initialization_is_xavier_with_biases_filled_with_0_01():
    k, t = _keras("lenet5", "no-bn", seed=5), _torch("lenet5", "no-bn", seed=5)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert np.all(k.get_layer(name).bias.numpy() == np.float32(0.01)), name
        assert torch.all(getattr(t, name).bias == torch.tensor(0.01)), name
        fan_in, fan_out = getattr(t, name).weight[0].numel(), getattr(t, name).weight.shape[0]
        if name.startswith("conv"):
            fan_out *= getattr(t, name).weight[0, 0].numel()
        bound = float(np.sqrt(6.0 / (fan_in + fan_out)))  # Glorot & Bengio (2010), eq. 16
        for weights in (k.get_layer(name).kernel.numpy(), getattr(t, name).weight.detach().numpy()):
            assert 0.9 * bound < np.abs(weights).max() <= bound, name


# --- the 32x32 bilinear resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [28, 40, 32], ids=["up-28", "down-40", "same-32"])
def test_bilinear_resize_equals_torch_interpolate(side):
    x = _images(4, side)
    ours = np.asarray(BilinearResize(32, 32)(x))
    peer = torch.nn.functional.interpolate(_nchw(x), size=(32, 32), mode="bilinear", align_corners=False)
    # float32 interpolation of values in [0, 1]: two products and a sum per axis, ~1 ulp apart (6e-8).
    np.testing.assert_allclose(ours, peer.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_bilinear_resize_survives_save_and_load(tmp_path):
    model = _keras("lenet5", "ours", seed=1)
    model.save(tmp_path / "lenet5.keras")
    loaded = keras.saving.load_model(tmp_path / "lenet5.keras")
    x = _images(2)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


# --- d2l's from-scratch BN ----------------------------------------------------------------------------------------


def test_d2l_defaults_are_the_chapters_scratch_bn():
    k = _keras("d2l-lenet-bn", "ours")
    assert {(k.get_layer(n).convention, k.get_layer(n).momentum, k.get_layer(n).epsilon) for n in BN_LAYERS} == {
        ("d2l", 0.9, 1e-5)
    }
    t = _torch("d2l-lenet-bn", "ours")
    assert [type(getattr(t, n)) for n in BN_LAYERS] == [D2LBatchNorm2d, D2LBatchNorm2d, D2LBatchNorm1d, D2LBatchNorm1d]
    assert {(getattr(t, n).momentum, getattr(t, n).eps) for n in BN_LAYERS} == {(0.9, 1e-5)}
    framework = _keras("d2l-lenet-bn", "framework")
    assert isinstance(framework.get_layer("bn1"), keras.layers.BatchNormalization)


@pytest.mark.parametrize("torch_convention", ["d2l", "torch"])
def test_d2l_moving_averages_match_keras_d2l_convention(torch_convention):
    """One training-mode forward from identical weights: torch's d2l BN keeps the biased variance like Keras' d2l."""
    k = _keras("d2l-lenet-bn", "ours", seed=2)
    t = _torch("d2l-lenet-bn", "ours", convention=torch_convention)
    torch_ref.keras_to_torch(k, t)
    x = _images(16, seed=3)
    k(x, training=True)
    t.train()(_nchw(x))
    differs = {}
    for name in BN_LAYERS:
        keras_var = k.get_layer(name).moving_variance.numpy()
        torch_var = getattr(t, name).running_var.numpy()
        np.testing.assert_allclose(getattr(t, name).running_mean.numpy(), k.get_layer(name).moving_mean.numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
        differs[name] = not np.allclose(torch_var, keras_var, rtol=1e-5, atol=1e-6)
    # bn4 has m = 16 values per channel: unbiased vs biased differs by 16/15 there, far beyond float32 noise
    # (moving statistics of O(1e-2..1) from <= 9,216-value float32 sums agree to ~1e-7 relative).
    assert differs["bn4"] == (torch_convention == "torch")
    if torch_convention == "d2l":
        assert not any(differs.values())


# --- transfer and logits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["ours", "framework", "no-bn"])
@pytest.mark.parametrize("model", MODELS)
def test_transfer_round_trip_is_bit_exact_and_logits_agree(model, flavour):
    k = _keras(model, flavour, seed=3)
    if flavour != "no-bn":
        _randomize_bn(k, seed=4)
    t = torch_ref.keras_to_torch(k, _torch(model, flavour, seed=9))
    back = torch_ref.torch_to_keras(t, _keras(model, flavour, seed=11))
    for a, b in zip(k.get_weights(), back.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _images(8, seed=5)
    with torch.no_grad():
        torch_logits = t.eval()(_nchw(x)).numpy()
    keras_logits = np.asarray(k(x, training=False))
    # Same float32 weights, different kernels (im2col vs oneDNN, summation order): logits of magnitude <= ~10
    # agree to a few 1e-7; the bound is 1e-5 of the logit scale (export.agreement.RTOL's figure).
    close(torch_logits, keras_logits, tolerance("summation-order", "float32"), scale="magnitude", what="logits")
    assert (torch_logits.argmax(1) == keras_logits.argmax(1)).all()


@pytest.mark.parametrize("model", MODELS)
def test_spec_forward_matches_keras(model):
    """export.runtimes.run_spec (float64 NumPy, BN by spec) knows sigmoid, tanh, average pooling and the resize."""
    k = _keras(model, "ours", seed=6)
    _randomize_bn(k, seed=7)
    x = _images(8, seed=8)
    expected = run_spec(k, x)
    # float32 Keras against float64: logits of O(1-10) agree to ~1e-6; 1e-5 of the scale as for every runtime.
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(k(x, training=False)), expected, rtol=0, atol=1e-5 * scale)


# --- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framework", "model", "kwargs", "message"),
    [
        ("keras", "d2l-lenet-bn", {"batch_norm": "keras", "convention": "d2l"}, "only follows the 'keras' convention"),
        ("keras", "lenet5", {"batch_norm": None, "convention": "keras"}, "builds no BN layers"),
        ("keras", "d2l-lenet-bn", {"input_shape": (8, 8, 1)}, "too small"),
        ("torch", "d2l-lenet-bn", {"batch_norm": "torch", "convention": "d2l"}, "convention must be"),
        ("torch", "d2l-lenet-bn", {"batch_norm": None, "convention": "d2l"}, "builds no BN layers"),
        ("torch", "lenet5", {"batch_norm": "keras"}, "batch_norm must be"),
    ],
    ids=["keras-builtin-d2l", "keras-no-bn-convention", "keras-too-small", "torch.nn-d2l", "torch-no-bn", "torch-kind"],
)
def test_bad_arguments_raise(framework, model, kwargs, message):
    builders = keras_bn.model.BUILDERS if framework == "keras" else torch_ref.model.BUILDERS
    with pytest.raises(ValueError, match=message):
        builders[model](**kwargs)


def test_lenet5_accepts_any_input_size_through_the_resize():
    x = np.zeros((2, 20, 24, 1), np.float32)
    assert tuple(_keras("lenet5", "ours", input_shape=(20, 24, 1))(x).shape) == (2, 10)
    assert tuple(_torch("lenet5", "ours")(torch.zeros(2, 1, 20, 24)).shape) == (2, 10)


# --- recipes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "optimizer", "lr", "momentum", "batch_size", "dataset"),
    [
        ("lenet-bn", "sgd", 0.05, 0.9, 32, "mnist"),
        ("d2l-lenet-bn", "sgd", 1.0, 0.0, 256, "fashion"),
        ("lenet5", "adam", 1e-3, None, 64, "mnist"),
    ],
    ids=["lenet-bn", "d2l-lenet-bn", "lenet5"],
)
def test_recipe_compiles_the_sources_optimizer(name, optimizer, lr, momentum, batch_size, dataset):
    recipe = recipes.RECIPES[name]
    assert (recipe.batch_size, recipe.epochs, recipe.dataset) == (batch_size, 10, dataset)
    model = recipe.build_keras("ours", seed=0)
    expected = keras.optimizers.SGD if optimizer == "sgd" else keras.optimizers.Adam
    assert type(model.optimizer) is expected
    assert float(model.optimizer.learning_rate) == pytest.approx(lr, rel=1e-7)  # stored as float32
    if momentum is not None:
        assert model.optimizer.momentum == momentum
    assert model.name.startswith({"lenet-bn": "lenet_bn", "d2l-lenet-bn": "d2l_lenet_bn", "lenet5": "lenet5"}[name])
    assert torch_ref.keras_to_torch(model, recipe.build_torch()) is not None  # twins fit each other


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ("digits", 1.0, 256, 10, True)),
        ({"data_dir": "data"}, ("fashion", 1.0, 256, 10, False)),
        ({"download": True}, ("fashion", 1.0, 256, 10, False)),
        ({"dataset": "mnist", "lr": 0.1, "batch_size": 8, "epochs": 2}, ("mnist", 0.1, 8, 2, False)),
        ({"dataset": "digits"}, ("digits", 1.0, 256, 10, False)),
    ],
    ids=["offline-fallback", "data-dir", "download", "every-flag-overrides", "digits-asked-for"],
)
def test_resolve_applies_flags_over_the_recipe(given, expected):
    resolved = recipes.resolve("d2l-lenet-bn", **given)
    got = (resolved.dataset, resolved.lr, resolved.batch_size, resolved.epochs, resolved.dataset_note is not None)
    assert got == expected
    if resolved.dataset_note:
        assert "fashion" in resolved.dataset_note and "--data-dir" in resolved.dataset_note
    config = resolved.to_config()
    assert config["name"] == "d2l-lenet-bn" and config["lr"] == 1.0  # the recipe's own settings, beside overrides


def test_resolve_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="--model must be one of"):
        recipes.resolve("alexnet")


# --- end to end: keras-bn run --model (slow: trains two nets, exports four ONNX files, runs eight runtimes) --------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "data"),
    [("d2l-lenet-bn", "shared"), ("lenet5", "shared"), ("lenet5", "embedded")],
    ids=["d2l-lenet-bn-fashion", "lenet5-mnist", "lenet5-embedded-digits"],
)
def test_cli_runs_each_recipe_end_to_end(model, data, tmp_path, capsys, request):
    from export import cli

    recipe = recipes.RECIPES[model]
    argv = ["run", "--model", model, "--limit", "64", "--epochs", "1", "--out", str(tmp_path / "out"), "--quiet"]
    if data == "shared":
        data_dir = request.getfixturevalue(f"{recipe.dataset}_dir").parent  # mnist_dir / fashion_dir (conftest)
        argv += ["--data-dir", str(data_dir)]  # no --dataset: the recipe picks it
    assert cli.main(argv) == cli.EXIT_OK, capsys.readouterr().err[-3000:]
    (report_path,) = (tmp_path / "out").rglob("report.json")  # wherever the CLI's output layout puts it
    report = json.loads(report_path.read_text())
    config = report["config"]
    assert (config["model"], config["recipe"]["name"], config["optimizer"]) == (model, model, recipe.optimizer)
    assert (config["lr"], config["batch_size"], config["epochs"]) == (recipe.lr, recipe.batch_size, 1)  # --epochs won
    expected_dataset = recipe.dataset if data == "shared" else "digits"
    assert report["dataset"]["name"] == expected_dataset and report["dataset"]["n_test"] == 64
    assert (config["recipe"]["dataset_note"] is None) == (data == "shared")
    if data == "embedded":  # the report tells the reader the recipe's own data was not available
        assert recipe.dataset in config["recipe"]["dataset_note"]
    assert config["convention"] == ("d2l" if model == "d2l-lenet-bn" else "keras")
    assert report["agreement_passed"] is True and "spec" in report["runtimes"]
    assert all(p["passed"] and p["argmax_agreement"] == 1.0 for p in report["agreement"])
    assert (report_path.parent / "curves.png").stat().st_size > 0
