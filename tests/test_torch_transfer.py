"""Keras <-> PyTorch weight transfer: bit-exact round trips, same logits on MNIST, clear errors, nothing half-copied."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from numerics import close, tolerance
from torch import nn

import keras_bn
import torch_ref
from mnist_data import to_nchw_float, to_nhwc_float


def _keras_lenet(batch_norm: str | None, seed: int = 0, **kwargs) -> keras.Model:
    return keras_bn.lenet_bn(batch_norm, seed=seed, **kwargs)


def _randomize(model: keras.Model, seed: int) -> keras.Model:
    """Non-trivial values everywhere (BN starts as identity, biases at 0: a transfer bug could hide there)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for variable in layer.weights:
            name, shape = variable.path.split("/")[-1], tuple(variable.shape)
            if variable.dtype == "int64":
                value = np.asarray(7)
            elif name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 2.0, shape)
            elif name == "kernel":
                value = keras.ops.convert_to_numpy(variable) * rng.uniform(0.8, 1.2, shape)
            else:  # bias, beta, moving_mean
                value = rng.normal(0.0, 0.2, shape)
            variable.assign(value.astype(variable.dtype))
    return model


def _keras_weights(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def _torch_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# Keras and torch logits of the same float32 weights: the same formulas summed in another order (oneDNN
# in both, different blocking), bounded relative to the largest logit: 1e-5 * max(1, max |logit|).
LOGITS_TOL = tolerance("summation-order", "float32")
PAIRS = [("ours", "ours"), ("ours", "torch"), ("keras", "ours"), ("keras", "torch"), (None, None)]
PAIR_IDS = ["keras_bn-torch_ref", "keras_bn-torch.nn", "keras.layers-torch_ref", "keras.layers-torch.nn", "no-bn"]


@pytest.mark.parametrize("keras_bn_kind, torch_bn_kind", PAIRS, ids=PAIR_IDS)
def test_round_trip_is_bit_exact(keras_bn_kind: str | None, torch_bn_kind: str | None) -> None:
    source = _randomize(_keras_lenet(keras_bn_kind), seed=1)
    torch_model = torch_ref.keras_to_torch(source, torch_ref.lenet_bn(torch_bn_kind))
    target = torch_ref.torch_to_keras(torch_model, _keras_lenet(keras_bn_kind, seed=5))
    for a, b, variable in zip(_keras_weights(source), _keras_weights(target), source.weights, strict=True):
        assert np.array_equal(a, b), f"{variable.path} changed in the Keras -> torch -> Keras round trip"
    # and the other way: torch -> Keras -> torch
    torch_source = torch_ref.lenet_bn(torch_bn_kind, seed=2)
    with torch.no_grad():
        for tensor in torch_source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())) + 0.5)
    torch_back = torch_ref.keras_to_torch(
        torch_ref.torch_to_keras(torch_source, _keras_lenet(keras_bn_kind)), torch_ref.lenet_bn(torch_bn_kind)
    )
    for (name, a), b in zip(torch_source.state_dict().items(), torch_back.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert torch.equal(a, b), f"{name} changed in the torch -> Keras -> torch round trip"


@pytest.mark.parametrize("keras_bn_kind, torch_bn_kind", PAIRS, ids=PAIR_IDS)
def test_same_logits_on_mnist_test_images(keras_bn_kind: str | None, torch_bn_kind: str | None, mnist_test) -> None:
    """All 10,000 MNIST test images in inference mode: max|dlogit| <= 1e-5 * max(1, max|logit|), same argmax."""
    images, _ = mnist_test
    keras_model = _randomize(_keras_lenet(keras_bn_kind, epsilon=1e-3) if keras_bn_kind else _keras_lenet(None), 3)
    torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn(torch_bn_kind)).eval()
    keras_logits = keras_model.predict(to_nhwc_float(images), batch_size=1000, verbose=0)
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(to_nchw_float(images))).numpy()
    # float32 through 5 layers with differently ordered sums stays within a few ulp of the largest logit.
    close(keras_logits, torch_logits, LOGITS_TOL, scale="magnitude", what="keras vs torch logits")
    disagree = np.flatnonzero(keras_logits.argmax(1) != torch_logits.argmax(1))
    assert disagree.size == 0, f"argmax differs on test images {disagree[:10].tolist()}"
    assert keras_logits.shape == (10_000, 10)


def test_flatten_feature_order_is_permuted_as_derived() -> None:
    """Keras feature (h, w, c) of the 4x4x16 map is torch feature c*16 + h*4 + w; fc1's rows move accordingly."""
    keras_model = _keras_lenet(None)
    fc1 = keras_model.get_layer("fc1")
    kernel = np.zeros(tuple(fc1.kernel.shape), np.float32)
    h, w, c = 1, 2, 3
    kernel[h * 4 * 16 + w * 16 + c, 7] = 1.0  # Keras flattens NHWC in (h, w, c) order
    fc1.kernel.assign(kernel)
    torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn(None))
    nonzero = torch.nonzero(torch_model.fc1.weight).tolist()
    assert nonzero == [[7, c * 16 + h * 4 + w]]  # torch flattens NCHW in (c, h, w) order


def test_bn_settings_are_carried_and_momentum_converted() -> None:
    keras_model = _keras_lenet("keras", momentum=0.99, epsilon=1e-3)
    torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn("ours", momentum=0.5, eps=1e-5))
    # Keras weights the old value by 0.99, torch the new one by 0.01 (spec.convert_momentum); 1 - 0.99 in binary.
    assert all(m.eps == 1e-3 and m.momentum == pytest.approx(0.01, abs=1e-15) for m in _torch_bns(torch_model))
    torch_ref.torch_to_keras(torch_ref.lenet_bn("torch", momentum=0.1, eps=1e-5), keras_model)
    layers = [keras_model.get_layer(f"bn{i}") for i in range(1, 5)]
    assert all(layer.epsilon == 1e-5 and layer.momentum == pytest.approx(0.9, abs=1e-15) for layer in layers)


def test_torch_convention_layer_keeps_momentum_and_counter() -> None:
    """keras_bn.BatchNorm(convention='torch'): momentum is not converted; 'cumulative' <-> None carries the counter."""
    keras_model = _keras_lenet("ours", convention="torch", momentum="cumulative", epsilon=1e-5)
    for i in range(1, 5):
        keras_model.get_layer(f"bn{i}").num_batches_tracked.assign(40 + i)
    torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn("torch", momentum=0.1))
    assert [int(m.num_batches_tracked) for m in _torch_bns(torch_model)] == [41, 42, 43, 44]
    assert all(m.momentum is None for m in _torch_bns(torch_model))
    fixed = torch_ref.keras_to_torch(_keras_lenet("ours", convention="torch", momentum=0.1), torch_ref.lenet_bn("ours"))
    assert all(m.momentum == 0.1 for m in _torch_bns(fixed))


def test_torch_cumulative_momentum_needs_a_counting_keras_layer() -> None:
    torch_model = torch_ref.lenet_bn("ours", momentum=None)
    keras_model = _keras_lenet("keras")
    before = _keras_weights(keras_model)
    with pytest.raises(ValueError, match=r"'bn1'.*momentum=None"):
        torch_ref.torch_to_keras(torch_model, keras_model)
    assert all(np.array_equal(a, b) for a, b in zip(before, _keras_weights(keras_model), strict=True))


@pytest.mark.parametrize(
    "keras_kwargs, ok",
    [({"batch_norm": "keras"}, False), ({"batch_norm": "ours", "convention": "torch", "momentum": 0.1}, True)],
    ids=["keras-biased-vs-torch-unbiased", "torch-convention"],
)
def test_same_estimator_refuses_a_biased_unbiased_pair(keras_kwargs: dict, ok: bool) -> None:
    keras_model = keras_bn.lenet_bn(**keras_kwargs)
    torch_model = torch_ref.lenet_bn("torch")
    if ok:
        torch_ref.keras_to_torch(keras_model, torch_model, same_estimator=True)
    else:
        with pytest.raises(ValueError, match=r"'bn1'.*biased.*unbiased"):
            torch_ref.keras_to_torch(keras_model, torch_model, same_estimator=True)


def _torch_bns(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.modules.batchnorm._BatchNorm, torch_ref.BatchNorm1d, torch_ref.BatchNorm2d)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _torch_with(replace: dict[str, nn.Module], batch_norm: str | None = "ours") -> nn.Module:
    model = torch_ref.lenet_bn(batch_norm, seed=0)
    for name, module in replace.items():
        setattr(model, name, module)
    return model


def _conv_bn_keras(axis: int) -> keras.Model:
    """Conv2D(6, 3) on 8x8x1 (a 6x6x6 map), BN over ``axis``, Flatten, Dense(10)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(6, 3, name="conv"),
            keras.layers.BatchNormalization(axis=axis, name="bn"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(10, name="fc"),
        ]
    )


def _conv_bn_torch() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3), torch_ref.BatchNorm2d(6), nn.Flatten(), nn.Linear(216, 10))


@pytest.mark.parametrize("axis", [-1, 3], ids=["axis-1", "axis3"])
def test_bn_over_the_channel_axis_transfers_with_equal_logits(axis: int) -> None:
    """Both spellings of the channel axis pass the axis check and give torch's logits (the refusals are below)."""
    keras_model = _randomize(_conv_bn_keras(axis), seed=2)
    torch_model = torch_ref.keras_to_torch(keras_model, _conv_bn_torch()).eval()
    x = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    close(keras_model(x), expected, LOGITS_TOL, scale="magnitude", what="logits")


MISMATCHES = {
    "torch-has-no-bn": (lambda: _keras_lenet("ours"), lambda: torch_ref.lenet_bn(None), "'bn1'"),
    "keras-has-no-bn": (lambda: _keras_lenet(None), lambda: torch_ref.lenet_bn("ours"), "'bn1'"),
    "fc3-width": (lambda: _keras_lenet("ours"), lambda: _torch_with({"fc3": nn.Linear(84, 5)}), "'fc3'"),
    "conv2-kernel": (lambda: _keras_lenet("ours"), lambda: _torch_with({"conv2": nn.Conv2d(6, 16, 3)}), "'conv2'"),
    "conv1-padding": (
        lambda: _keras_lenet("ours"),
        lambda: _torch_with({"conv1": nn.Conv2d(1, 6, 5, padding=2)}),
        "'conv1'.*padding",
    ),
    "bn2-width": (lambda: _keras_lenet("ours"), lambda: _torch_with({"bn2": torch_ref.BatchNorm2d(8)}), "'bn2'"),
    "bn-no-tracking": (
        lambda: _keras_lenet("keras"),
        lambda: _torch_with({"bn3": nn.BatchNorm1d(120, track_running_stats=False)}, "torch"),
        "'bn3'.*running statistics",
    ),
    "keras-center-false": (lambda: _keras_lenet("keras", center=False), lambda: torch_ref.lenet_bn("ours"), "'bn1'"),
    "extra-torch-layer": (
        lambda: _keras_lenet("ours"),
        lambda: nn.Sequential(torch_ref.lenet_bn("ours"), nn.Linear(10, 10)),
        "'1'.*no Keras counterpart",
    ),
    # Issue 9: a BN over the rows of a 6x6x6 map has 6 features like BatchNorm2d(6), but other statistics.
    "bn-over-rows": (
        lambda: _conv_bn_keras(axis=1),
        lambda: _conv_bn_torch(),
        r"'bn'.*axis 1.*channel axis.*'conv'.* 3",
    ),
    "bn-over-columns": (lambda: _conv_bn_keras(axis=-2), lambda: _conv_bn_torch(), r"'bn'.*axis -2"),
    "unsupported-keras-layer": (
        lambda: keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization(name="ln")]),
        lambda: nn.Sequential(nn.LayerNorm(4)),
        "'ln'.*LayerNormalization",
    ),
}


@pytest.mark.parametrize("direction", ["keras_to_torch", "torch_to_keras"])
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatch_names_the_first_misfit_and_copies_nothing(case: str, direction: str) -> None:
    make_keras, make_torch, pattern = MISMATCHES[case]
    keras_model, torch_model = make_keras(), make_torch()
    keras_before, torch_before = _keras_weights(keras_model), _torch_state(torch_model)
    with pytest.raises(ValueError, match=pattern):
        if direction == "keras_to_torch":
            torch_ref.keras_to_torch(keras_model, torch_model)
        else:
            torch_ref.torch_to_keras(torch_model, keras_model)
    assert all(np.array_equal(a, b) for a, b in zip(keras_before, _keras_weights(keras_model), strict=True))
    assert all(torch.equal(torch_before[k], v) for k, v in torch_model.state_dict().items())


def test_per_layer_bn_mapping_both_ways() -> None:
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4)
    layer.build((None, 5))
    rng = np.random.default_rng(0)
    for variable in layer.weights:
        variable.assign(rng.uniform(0.5, 2.0, 5).astype("float32"))
    module = torch_ref.BatchNorm1d(5)
    torch_ref.batch_norm_keras_to_torch(layer, module)
    assert torch.equal(module.running_var, torch.from_numpy(keras.ops.convert_to_numpy(layer.moving_variance)))
    assert module.eps == 1e-4 and module.momentum == pytest.approx(0.1, abs=1e-15)
    with torch.no_grad():
        module.weight.fill_(3.0)
    torch_ref.batch_norm_torch_to_keras(module, layer)
    assert np.all(keras.ops.convert_to_numpy(layer.gamma) == 3.0)
    with pytest.raises(TypeError, match="BN"):
        torch_ref.batch_norm_keras_to_torch(keras.layers.Dense(5), module)
    with pytest.raises(ValueError, match="moving_mean"):
        torch_ref.batch_norm_keras_to_torch(layer, torch_ref.BatchNorm1d(6))


def test_new_epsilon_reaches_an_already_traced_predict() -> None:
    """torch_to_keras changes epsilon after Keras traced predict(): the next predict must use the new value."""
    keras_model = _randomize(_keras_lenet("keras", epsilon=1e-3), 4)
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    keras_model.predict(x, verbose=0)  # traces with epsilon 1e-3
    torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn("torch"))
    for module in _torch_bns(torch_model):
        module.eps = 0.5  # large enough to move the logits well beyond float32 noise
    torch_ref.torch_to_keras(torch_model, keras_model)
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    close(keras_model.predict(x, verbose=0), expected, LOGITS_TOL, scale="magnitude", what="logits")
