"""keras_bn.replace_batch_norm: every Keras BN layer becomes ours, weights carried, outputs bit-identical.

Oracle: the original model itself. Before an option changes anything, the rebuilt model's
inference outputs must equal the original's bit for bit; with an option, the option must be in
force (e.g. ``stats_update="frozen"``: a training step leaves the statistics, Keras' layer moves them).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_bn


def set_bn_state(model: keras.Model, rng) -> None:
    """Non-initial statistics and affine in every BN layer, nested ones included."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable in layer.weights:
                variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(variable.dtype))


def bn_layers(model: keras.Model) -> list:
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def functional() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn_conv")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, renorm=True)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def sequential() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(center=False, trainable=False),
        ]
    )


def nested() -> keras.Model:
    """A Sequential block inside a Functional model, which is itself inside another: BN at every level."""
    inner = keras.Model(
        block_in := keras.Input((8, 8, 4)), keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(block_in))
    )
    middle = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"), inner])
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization(axis=1)(middle(inputs))
    return keras.Model(inputs, keras.layers.Flatten()(x))


MODELS = [
    pytest.param(functional, (8, 8, 3), 2, id="functional"),
    pytest.param(sequential, (10,), 2, id="sequential"),
    pytest.param(nested, (8, 8, 3), 2, id="nested"),
]


@pytest.mark.parametrize(("build", "input_shape", "count"), MODELS)
def test_replaced_model_is_ours_throughout_and_bit_identical(rng, build, input_shape, count):
    model = build()
    set_bn_state(model, rng)
    x = rng.normal(size=(5, *input_shape)).astype(np.float32)
    y = np.asarray(model(x))
    replaced = keras_bn.replace_batch_norm(model)
    old, new = bn_layers(model), bn_layers(replaced)
    assert len(new) == len(old) >= count
    assert all(type(layer) is keras_bn.BatchNorm for layer in new)
    assert all(type(layer) is keras.layers.BatchNormalization for layer in old)  # the input model is untouched
    for a, b in zip(old, new, strict=True):
        assert (a.name, a.trainable, a.axis, a.epsilon) == (b.name, b.trainable, b.axis, b.epsilon)
        assert [w.name for w in a.weights] == [w.name for w in b.weights]
        for wa, wb in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    np.testing.assert_array_equal(np.asarray(replaced(x)), y)


def test_frozen_option_keeps_pretrained_statistics_through_fit(rng):
    """The fine-tuning fix: stats_update="frozen" trains with batch statistics but never moves the stored ones."""
    model = sequential()
    set_bn_state(model, rng)
    frozen = keras_bn.replace_batch_norm(model, stats_update="frozen")
    before = [layer.moving_mean.numpy().copy() for layer in bn_layers(frozen)]
    frozen.compile("sgd", "mse")
    x, y = rng.normal(size=(16, 10)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    frozen.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for layer, mean in zip(bn_layers(frozen), before, strict=True):
        assert layer.stats_update == "frozen"
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    model.compile("sgd", "mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # Keras' layer (the trainable one) moves them
    assert not np.array_equal(bn_layers(model)[0].moving_mean.numpy(), before[0])


def test_convention_option_converts_momentum_and_keeps_epsilon():
    torch_like = keras_bn.replace_batch_norm(functional(), convention="torch", renorm=False)
    layer = torch_like.get_layer("bn_conv")
    assert (layer.convention, layer.epsilon) == ("torch", pytest.approx(1e-3))
    assert layer.momentum == pytest.approx(0.1)  # Keras 0.9 weights the old value: torch 0.1 the new one


def test_ours_with_options_is_rebuilt_and_without_is_kept():
    model = keras.Sequential([keras.Input((4,)), keras_bn.BatchNorm()])
    assert keras_bn.replace_batch_norm(model).layers[0] is model.layers[0]
    assert keras_bn.replace_batch_norm(model, stats_update="frozen").layers[0].stats_update == "frozen"


def test_subclassed_model_is_refused_naming_it():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="my_net")
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(TypeError, match="'my_net' is a subclassed Net"):
        keras_bn.replace_batch_norm(Net())


def test_bad_option_is_refused_before_anything_is_returned():
    with pytest.raises(ValueError, match="stats_update"):
        keras_bn.replace_batch_norm(sequential(), stats_update="sometimes")


@pytest.mark.slow
def test_mobilenet_v2_all_52_batch_norms_replaced_bit_identically(rng):
    """keras.applications.MobileNetV2(weights=None) builds offline; ~25 s on 2 busy cores, hence slow."""
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    set_bn_state(model, rng)
    x = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    y = np.asarray(model(x))
    replaced = keras_bn.replace_batch_norm(model)
    assert len(bn_layers(model)) == 52 and all(type(layer) is keras_bn.BatchNorm for layer in bn_layers(replaced))
    np.testing.assert_array_equal(np.asarray(replaced(x)), y)
    frozen = keras_bn.replace_batch_norm(model, stats_update="frozen", normalize_with="moving")
    assert {(layer.stats_update, layer.normalize_with) for layer in bn_layers(frozen)} == {("frozen", "moving")}
    np.testing.assert_array_equal(np.asarray(frozen(x, training=True)), y)  # frozen + moving: inference's output
