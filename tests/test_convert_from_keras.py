"""torch_ref.from_keras: each Keras layer kind, converted, computes what Keras computes (oracle: Keras itself).

Every case ends in Flatten + Dense(10) (so the NHWC flatten order is checked everywhere) and has
its BN statistics moved by training-mode passes on real digits before conversion. Checks:
inference outputs; one training-mode step (outputs with batch statistics, then the moving
statistics it left behind, seen through inference outputs).

Tolerances: float64 1e-12 of the logit scale: every kernel is a short sum of float64 products
(measured <= 5e-15 relative); GELU cases 1e-8, because TensorFlow's float64 erfc (tf.nn.gelu's
exact form) is itself off by up to 5.0e-9 on [-4, 4] against torch's (measured). float32: 1e-4
relative (the issue's bound; float32 accumulation over <= 300 terms of O(1) values is ~1e-6) and
identical argmax.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
import torch
from keras import layers as L

import keras_bn
import spec
import torch_ref
from tests._convert_models import digit_images, floatx, move_statistics, relative_error, torch_outputs
from torch_ref import from_keras

SIZE, CHANNELS, BATCH = 12, 3, 32
F64_TOL, F64_GELU_TOL, F32_TOL = 1e-12, 1e-8, 1e-4


def _conv_bn(x, **conv):
    return L.BatchNormalization(momentum=0.9)(L.Conv2D(6, 3, **conv)(x))


# Case id -> body(x) on a (SIZE, SIZE, CHANNELS) input; ids name the layer kind and its options.
CASES: dict[str, Callable] = {
    "conv2d-same-stride2": lambda x: _conv_bn(x, strides=2, padding="same"),
    "conv2d-same-stride1-even-kernel": lambda x: L.Conv2D(4, 4, padding="same", activation="relu")(x),
    "conv2d-valid-dilation2": lambda x: _conv_bn(x, dilation_rate=2),
    "conv2d-groups3-nobias": lambda x: L.Conv2D(6, 3, groups=3, use_bias=False)(x),
    "depthwise-mult2-same-stride2": lambda x: L.BatchNormalization()(
        L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(x)
    ),
    "separable-dilation2-swish": lambda x: L.SeparableConv2D(5, 3, padding="same", dilation_rate=2, activation="swish")(
        x
    ),
    "bn-keras-eps1.001e-5": lambda x: L.BatchNormalization(epsilon=1.001e-5, momentum=0.9)(x),
    "bn-ours-torch-convention": lambda x: keras_bn.BatchNorm(convention="torch", momentum=0.1)(L.Conv2D(4, 3)(x)),
    "bn-ours-tf1-convention": lambda x: keras_bn.BatchNorm(convention="tf1", momentum=0.9)(L.Conv2D(4, 3)(x)),
    "bn-ours-torch-cumulative": lambda x: keras_bn.BatchNorm(convention="torch", momentum="cumulative")(x),
    "bn-axis1-height": lambda x: L.BatchNormalization(axis=1, momentum=0.9)(x),
    "bn-no-scale-no-center": lambda x: L.BatchNormalization(scale=False, center=False, momentum=0.9)(x),
    "bn-frozen-trainable-false": lambda x: L.BatchNormalization(trainable=False)(x),
    "bn-rank2-after-dense": lambda x: L.BatchNormalization(momentum=0.9)(L.Dense(8)(L.Flatten()(x))),
    "bn-rank3-after-reshape": lambda x: L.BatchNormalization(momentum=0.9)(L.Reshape((SIZE * SIZE, CHANNELS))(x)),
    "relu6-layer": lambda x: L.ReLU(max_value=6.0)(L.Conv2D(4, 3)(x)),
    "relu-slope-threshold": lambda x: L.ReLU(negative_slope=0.1, threshold=0.2)(L.Conv2D(4, 3)(x)),
    "activation-sigmoid": lambda x: L.Activation("sigmoid")(L.Conv2D(4, 3)(x)),
    "activation-tanh": lambda x: L.Activation("tanh")(L.Conv2D(4, 3)(x)),
    "activation-hard-sigmoid": lambda x: L.Activation("hard_sigmoid")(L.Conv2D(4, 3)(x)),
    "activation-hard-swish": lambda x: L.Activation("hard_swish")(L.Conv2D(4, 3)(x)),
    "activation-gelu": lambda x: L.Activation("gelu")(L.Conv2D(4, 3)(x)),
    "activation-softmax-channels": lambda x: L.Activation("softmax")(L.Conv2D(4, 3)(x)),
    "softmax-layer": lambda x: L.Softmax()(L.Conv2D(4, 3)(x)),
    "add-multiply-concatenate": lambda x: L.Concatenate()(
        [L.Add()([L.Conv2D(4, 1)(x), L.Conv2D(4, 1)(x)]), L.Multiply()([x, L.Conv2D(3, 1)(x)])]
    ),
    "zeropad-asymmetric-maxpool-valid": lambda x: L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(((1, 0), (0, 2)))(x)),
    "maxpool-same": lambda x: L.MaxPooling2D(3, strides=2, padding="same")(L.Conv2D(4, 1)(x)),
    "avgpool-valid": lambda x: L.AveragePooling2D(2)(x),
    "avgpool-same-excludes-padding": lambda x: L.AveragePooling2D(3, strides=2, padding="same")(x),
    "global-avgpool-keepdims-se": lambda x: L.Multiply()(
        [x, L.Conv2D(3, 1, activation="sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(x))]
    ),
    "global-maxpool": lambda x: L.Reshape((1, 1, CHANNELS))(L.GlobalMaxPooling2D()(x)),
    "reshape-se-block": lambda x: L.Multiply()([x, L.Reshape((1, 1, CHANNELS))(L.GlobalAveragePooling2D()(x))]),
    "dense-on-rank4-gelu": lambda x: L.Dense(5, activation="gelu")(x),
    "dropout": lambda x: L.Dropout(0.5)(L.Conv2D(4, 3)(x)),
    "rescaling-normalization": lambda x: L.Normalization(mean=[0.1, 0.2, 0.3], variance=[0.5, 1.0, 2.0])(
        L.Rescaling(1 / 255.0, offset=-0.5)(x)
    ),
    "identity": lambda x: L.Identity()(x),
    "nested-sequential": lambda x: keras.Sequential(
        [keras.Input((SIZE, SIZE, CHANNELS)), L.Conv2D(4, 3), L.BatchNormalization(momentum=0.9), L.ReLU()]
    )(x),
    "nested-functional-shared": lambda x: _shared_block()(_shared_block_applied(x)),
}


def _shared_block() -> keras.Model:
    inner = keras.Input((SIZE, SIZE, 4))
    return keras.Model(inner, L.BatchNormalization(momentum=0.9)(L.Conv2D(4, 3, padding="same")(inner)))


def _shared_block_applied(x):
    conv = L.Conv2D(4, 1)  # one layer called twice: one module, shared weights
    return L.Add()([conv(L.Conv2D(4, 1)(x)), conv(L.Conv2D(4, 1)(x))])


def _model(case: str, dtype: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    with floatx(dtype):
        inputs = keras.Input((SIZE, SIZE, CHANNELS))
        features = CASES[case](inputs)
        return keras.Model(inputs, L.Dense(10)(L.Flatten()(features)), name=case.replace("-", "_"))


def _tolerance(case: str) -> float:
    """float64 bound of a case (module docstring)."""
    return F64_GELU_TOL if "gelu" in case else F64_TOL


# float32 on the kinds whose arithmetic differs most between the frameworks (convolutions, pooling, BN).
FLOAT32_CASES = [
    "conv2d-same-stride2",
    "depthwise-mult2-same-stride2",
    "separable-dilation2-swish",
    "avgpool-same-excludes-padding",
    "bn-rank2-after-dense",
    "activation-gelu",
]


@pytest.mark.parametrize("case", list(CASES))
def test_float64_inference_and_training_step_match_keras(case: str) -> None:
    """Inference; then one training-mode call (batch statistics) and the moving statistics it leaves."""
    model = _model(case, "float64")
    images = digit_images(2 * BATCH, SIZE, CHANNELS, "float64")
    seen, batch = images[:BATCH], images[BATCH:]
    move_statistics(model, seen)
    module = from_keras(model)
    assert relative_error(torch_outputs(module, seen), keras.ops.convert_to_numpy(model(seen))) <= _tolerance(case)
    if case == "dropout":  # Keras and torch draw different masks in training
        return
    expected = keras.ops.convert_to_numpy(model(batch, training=True))
    actual = module.train()(torch.from_numpy(batch)).detach().numpy()
    assert relative_error(actual, expected) <= _tolerance(case)
    after = relative_error(torch_outputs(module.eval(), seen), keras.ops.convert_to_numpy(model(seen)))
    assert after <= _tolerance(case)


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_float32_inference_matches_keras(case: str) -> None:
    model = _model(case, "float32")
    images = digit_images(BATCH, SIZE, CHANNELS, "float32")
    move_statistics(model, images)
    expected = keras.ops.convert_to_numpy(model(images))
    actual = torch_outputs(from_keras(model), images)
    assert actual.dtype == np.float32
    assert relative_error(actual, expected) <= F32_TOL
    np.testing.assert_array_equal(actual.argmax(1), expected.argmax(1))


@pytest.mark.parametrize(
    ("layer", "convention", "momentum", "variance"),
    [
        (lambda: L.BatchNormalization(epsilon=1e-3, momentum=0.99), "keras", 0.01, "biased"),
        (lambda: keras_bn.BatchNorm(convention="torch", momentum=0.1, epsilon=1e-5), "torch", 0.1, "unbiased"),
        (lambda: keras_bn.BatchNorm(convention="onnx", momentum=0.9), "onnx", 0.1, "biased"),
    ],
    ids=["keras-builtin", "ours-torch", "ours-onnx"],
)
def test_batch_norm_carries_convention(layer, convention: str, momentum: float, variance: str) -> None:
    """Each BN becomes a torch_ref BN with the layer's eps, torch-style momentum and variance estimator."""
    keras_layer = layer()
    model = keras.Sequential([keras.Input((4, 4, 2)), keras_layer])
    bn = next(m for m in from_keras(model).modules() if isinstance(m, torch_ref.BatchNorm2d))
    assert bn.eps == pytest.approx(float(keras_layer.epsilon), rel=1e-15)
    assert bn.momentum == pytest.approx(momentum, rel=1e-12)  # new-value weight, as spec.convert_momentum gives
    assert bn.convention == convention

    assert spec.get_convention(bn.convention).running_variance == variance


def test_channels_first_option() -> None:
    model = _model("conv2d-same-stride2", "float64")
    images = digit_images(8, SIZE, CHANNELS, "float64")
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    module = from_keras(model, channels_last=False)
    assert relative_error(torch_outputs(module, nchw), keras.ops.convert_to_numpy(model(images))) <= F64_TOL
    assert torch_outputs(module, nchw).shape == (8, 10)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: L.Conv1D(2, 3),
        lambda: L.LSTM(2),
        lambda: L.BatchNormalization(renorm=True),
        lambda: keras_bn.BatchNorm(normalize_with="moving"),
        lambda: L.Dense(3, activation="sparsemax"),
    ],
    ids=["conv1d", "lstm", "renorm", "normalize-with-moving", "sparsemax-activation"],
)
def test_unsupported_layer_is_named(layer) -> None:
    keras_layer = layer()
    model = keras.Sequential([keras.Input((6, 4)), L.Dense(4, name="fine"), keras_layer])
    with pytest.raises(ValueError, match=rf"'{keras_layer.name}' \({type(keras_layer).__name__}\)"):
        from_keras(model)


def test_rejects_non_model() -> None:
    with pytest.raises(TypeError, match="keras_model must be a keras.Model"):
        from_keras(L.Dense(2))


def test_dropout_noise_shape_drops_whole_samples() -> None:
    """EfficientNet's stochastic depth: Keras noise_shape (None, 1, 1, 1) keeps or drops each sample whole."""
    model = keras.Sequential([keras.Input((4, 4, 3)), L.Dropout(0.5, noise_shape=(None, 1, 1, 1))])
    module = from_keras(model).train()
    torch.manual_seed(0)
    x = torch.rand(64, 4, 4, 3, dtype=torch.float64) + 1.0
    y = module(x)
    kept = (y != 0).flatten(1)
    assert bool((kept.all(1) | ~kept.any(1)).all())  # all or nothing per sample
    assert 0 < int(kept.all(1).sum()) < 64
    torch.testing.assert_close(y[kept.all(1)], 2.0 * x[kept.all(1)], rtol=0, atol=0)  # scaled by 1 / (1 - rate)


# (max_value, negative_slope, threshold): each of the branches of Keras' ReLU.static_call.
RELU_OPTIONS = {
    "relu6-native-op": (6.0, 0.0, 0.0),
    "relu-clip4": (4.0, 0.0, 0.0),
    "leaky": (None, 0.1, 0.0),
    "leaky-relu6": (6.0, 0.1, 0.0),
    "threshold": (None, 0.0, 0.5),
    "threshold-leaky-clip4": (4.0, 0.1, 0.5),
}


@pytest.mark.parametrize("options", list(RELU_OPTIONS.values()), ids=list(RELU_OPTIONS))
def test_relu_value_and_gradient_match_keras_at_the_kinks(options) -> None:
    """At x = 0, threshold and max_value a ReLU's gradient is a convention; the converted one must take Keras'.

    Oracle: TensorFlow's own gradient of the Keras layer (e.g. Relu6Grad is 0 at x == 6, a clip's is 1
    at its bound). Exact: every value and gradient here is x, 0, 1 or the slope times a small binary fraction.
    """
    import tensorflow as tf

    max_value, negative_slope, threshold = options
    points = np.array([-1.0, 0.0, 0.25, 0.5, 1.0, 4.0, 6.0, 7.0])
    with floatx("float64"):
        model = keras.Sequential([keras.Input((points.size,)), L.ReLU(max_value, negative_slope, threshold)])
    x = tf.constant(points[None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        expected = model(x)
    expected_gradient = tape.gradient(expected, x).numpy()
    x_torch = torch.tensor(points[None], requires_grad=True)
    actual = from_keras(model)(x_torch)
    actual.sum().backward()
    np.testing.assert_array_equal(actual.detach().numpy(), expected.numpy())
    np.testing.assert_array_equal(x_torch.grad.numpy(), expected_gradient)
