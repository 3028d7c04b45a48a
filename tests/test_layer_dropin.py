"""keras_bn.BatchNorm as a drop-in for keras.layers.BatchNormalization: type, config, and saved files both ways.

The peer is Keras' own layer: files it writes must load into a model built with ours and the
reverse, with the statistics really arriving (not left at their initializers, which is what
``skip_mismatch`` silently gave when the weight paths differed), and inference outputs equal
to float32 rounding (bit-identical with ``fused=False``: tests/test_keras_replace.py).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_bn

LAYERS = {"keras": keras.layers.BatchNormalization, "ours": keras_bn.BatchNorm}


def small_model(bn, seed: int = 0) -> keras.Model:
    """Conv -> BN (NHWC), BN on a channels-first view, Dense -> BN (NC), and a renorm BN: every weight layout."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(x)
    x = bn()(x)
    x = keras.layers.Permute((3, 1, 2))(x)
    x = bn(axis=1, momentum=0.9, epsilon=1e-4)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5)(x)
    x = bn(renorm=True)(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def with_trained_state(model: keras.Model, rng) -> keras.Model:
    """Give every BN weight a non-initial value (moving statistics 0/1 and gamma/beta 1/0 are initial)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable in layer.weights:
                variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(variable.dtype))
    return model


def bn_weights(model: keras.Model) -> list[np.ndarray]:
    return [
        w.numpy() for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights
    ]


def test_ours_is_a_keras_batch_normalization():
    layer = keras_bn.BatchNorm()
    assert isinstance(layer, keras.layers.BatchNormalization)
    assert layer.name.startswith("batch_normalization")  # Keras' default names, so model summaries match


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param(
            {"axis": 1, "momentum": 0.1, "convention": "torch", "stats_update": "deferred"}, id="torch-deferred"
        ),
        pytest.param({"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}}, id="renorm"),
        pytest.param({"convention": "torch", "momentum": "cumulative", "fused": False}, id="torch-cumulative"),
    ],
)
def test_config_round_trip(kwargs):
    layer = keras_bn.BatchNorm(**kwargs)
    config = layer.get_config()
    assert keras_bn.BatchNorm.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is keras_bn.BatchNorm and restored.get_config() == config


def test_dot_keras_file_of_ours_loads_as_ours(tmp_path, rng):
    model = with_trained_state(small_model(keras_bn.BatchNorm), rng)
    model.save(tmp_path / "ours.keras")
    loaded = keras.saving.load_model(tmp_path / "ours.keras")
    bns = [layer for layer in loaded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 3 and all(type(layer) is keras_bn.BatchNorm for layer in bns)
    for a, b in zip(bn_weights(model), bn_weights(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("file_name", ["model.weights.h5", "model.keras"], ids=["weights.h5", "keras"])
@pytest.mark.parametrize(
    ("source", "target"), [("keras", "ours"), ("ours", "keras")], ids=["keras-to-ours", "ours-to-keras"]
)
def test_saved_weights_load_across_layers_and_statistics_arrive(tmp_path, rng, source, target, file_name):
    saved = with_trained_state(small_model(LAYERS[source], seed=0), rng)
    path = tmp_path / file_name
    saved.save_weights(path) if file_name.endswith(".weights.h5") else saved.save(path)
    model = small_model(LAYERS[target], seed=1)  # other random Conv/Dense weights: the load must set them
    model.load_weights(path)  # strict: a missing or mismatched path raises
    for a, b in zip(bn_weights(saved), bn_weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(model.layers[2].moving_mean.numpy(), 0.0)  # not the initializer
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    # Ours' default inference runs TF's fused kernel where it applies (fused=None): a few float32 ulp
    # (1.2e-7 relative) from Keras' op on O(1) values through three BN layers, hence 1e-6.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(saved(x)), rtol=1e-6, atol=1e-6)


def test_weights_saved_before_the_rename_still_load(tmp_path, rng):
    """keras_bn <= 0.1.0 (class BatchNorm) stored weights under layers/batch_norm[_N]; they must still load.

    Such a file is made here by renaming the groups of a current one (h5py, the format's own library).
    """
    h5py = pytest.importorskip("h5py")
    saved = with_trained_state(small_model(keras_bn.BatchNorm, seed=0), rng)
    path = tmp_path / "old.weights.h5"
    saved.save_weights(path)
    with h5py.File(path, "r+") as f:
        names = [n for n in f["layers"] if n.startswith("batch_normalization")]
        assert names == ["batch_normalization", "batch_normalization_1", "batch_normalization_2"]
        for name in names:
            f["layers"].move(name, name.replace("batch_normalization", "batch_norm"))
    model = small_model(keras_bn.BatchNorm, seed=1)
    model.load_weights(path)
    for a, b in zip(bn_weights(saved), bn_weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
