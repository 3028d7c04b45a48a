"""The three LeNets of our sources in Keras 3, each with our BN, Keras' built-in BN, or none.

``lenet_bn``: LeNet-BN with ReLU and max pooling (the main job's model)::

    input 28x28x1
    conv1 Conv2D(6, 5)  -> bn1 -> relu1 -> pool1 MaxPool(2)
    conv2 Conv2D(16, 5) -> bn2 -> relu2 -> pool2 MaxPool(2)
    flatten -> fc1 Dense(120) -> bn3 -> relu3 -> fc2 Dense(84) -> bn4 -> relu4 -> fc3 Dense(10) (logits)

``d2l_lenet_bn``: Dive into Deep Learning's LeNet-BN ("batch normalization" chapter): the same shapes
with ``sigmoid1..4`` activations and 2x2 average pooling; our BN defaults to the chapter's
from-scratch moving averages, spec convention ``"d2l"``.

``lenet5``: LeNet-5 of the Paperspace article: a bilinear ``resize`` of the 28x28 input to 32x32
(half-pixel centres, no antialiasing: ``torch.nn.Upsample(mode="bilinear", align_corners=False)``
computes the same), then the same stages with ``tanh1..4`` and average pooling, so ``fc1`` sees
16x5x5 = 400 features; Glorot (Xavier) uniform kernels and biases filled with 0.01.

Convolutions use "valid" padding and, like the Dense layers, keep their biases (so each net matches
its PyTorch twin in ``torch_ref`` parameter for parameter); BN sits between each conv/hidden Dense
and its activation. Parameter counts are in each builder's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras

BATCH_NORM_CHOICES = ("ours", "keras", None)

# Smallest spatial size that survives conv5 -> pool2 -> conv5 -> pool2 with at least 1x1 left:
# ((h - 4) // 2 - 4) // 2 >= 1  <=>  h >= 16.
_MIN_SPATIAL = 16


def _check_input_shape(input_shape: Any, min_spatial: int = _MIN_SPATIAL) -> tuple[int, int, int]:
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}") from None
    if len(dims) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"input_shape must be three ints (height, width, channels), got {input_shape!r}")
    height, width, channels = dims
    if channels < 1:
        raise ValueError(f"input_shape needs at least one channel, got {input_shape!r}")
    if height < min_spatial or width < min_spatial:
        raise ValueError(
            f"input_shape {input_shape!r} is too small: two conv5+pool2 stages need height and width >= {min_spatial}"
        )
    return dims


def _make_batch_norm(batch_norm: str, name: str, convention: str, momentum, epsilon, bn_kwargs: dict) -> keras.Layer:
    kwargs = dict(bn_kwargs)
    if momentum is not None:
        kwargs["momentum"] = momentum
    if epsilon is not None:
        kwargs["epsilon"] = epsilon
    if batch_norm == "keras":
        return keras.layers.BatchNormalization(name=name, **kwargs)
    from keras_bn.layer import BatchNorm  # imported late: the layer module is heavier and optional here

    return BatchNorm(name=name, convention=convention, **kwargs)


@keras.saving.register_keras_serializable(package="keras_bn")
class BilinearResize(keras.layers.Layer):
    """Resize NHWC images to (height, width) by bilinear interpolation with half-pixel centres, no antialiasing.

    ``keras.ops.image.resize``: on TensorFlow ``tf.image.resize`` (ResizeBilinear, half_pixel_centers),
    which ``torch.nn.Upsample(mode="bilinear", align_corners=False)`` and ONNX ``Resize`` (half_pixel,
    linear) compute too. Not ``keras.layers.Resizing``: as a preprocessing layer it makes
    ``Model.export`` trace the BN layers after it in training mode (batch statistics in the ONNX file).
    """

    def __init__(self, height: int, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def call(self, images):
        return keras.ops.image.resize(images, (self.height, self.width), interpolation="bilinear", antialias=False)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "height": self.height, "width": self.width}


@dataclass(frozen=True)
class _Architecture:
    """What distinguishes the three LeNets; everything else (shapes, names, BN placement) is shared."""

    name: str  # model name stem: "<name>_bn_<batch_norm>" with BN, "<name>" without
    activation: str  # "relu" | "sigmoid" | "tanh"; layers are named f"{activation}{index}"
    pooling: type  # keras.layers.MaxPooling2D | keras.layers.AveragePooling2D
    default_convention: str  # of keras_bn.BatchNorm when convention is None
    resize_to: tuple[int, int] | None = None  # bilinear input resize (LeNet-5's 32x32)
    bias_fill: float | None = None  # constant bias initializer (the article's 0.01); None: zeros


_LENET_BN = _Architecture("lenet", "relu", keras.layers.MaxPooling2D, "keras")
_D2L = _Architecture("d2l_lenet", "sigmoid", keras.layers.AveragePooling2D, "d2l")
_LENET5 = _Architecture("lenet5", "tanh", keras.layers.AveragePooling2D, "keras", resize_to=(32, 32), bias_fill=0.01)


def _check_build_arguments(
    arch: _Architecture,
    batch_norm: str | None,
    convention: str | None,
    momentum: float | None,
    epsilon: float | None,
    num_classes: int,
    seed: int | None,
    bn_kwargs: dict,
) -> str | None:
    """Refuse arguments that cannot apply to ``arch`` with ``batch_norm``; return the convention to build with."""
    if batch_norm not in BATCH_NORM_CHOICES:
        raise ValueError(f"batch_norm must be one of {BATCH_NORM_CHOICES}, got {batch_norm!r}")
    if batch_norm is None:
        extra = {"momentum": momentum, "epsilon": epsilon, **bn_kwargs}
        given = sorted(k for k, v in extra.items() if v is not None)
        if given or convention is not None:
            # Silently ignoring them would make a "BN vs no BN" sweep look configured when it is not.
            raise ValueError(f"batch_norm=None builds no BN layers, so {given or ['convention']} cannot apply")
    elif batch_norm == "keras":
        if convention not in (None, "keras"):
            raise ValueError(
                f"keras.layers.BatchNormalization only follows the 'keras' convention, got convention={convention!r}; "
                "use batch_norm='ours' for other conventions"
            )
    elif convention is None:
        convention = arch.default_convention
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return convention


def _build(
    arch: _Architecture,
    batch_norm: str | None,
    convention: str | None,
    momentum: float | None,
    epsilon: float | None,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int | None,
    bn_kwargs: dict,
) -> keras.Model:
    convention = _check_build_arguments(arch, batch_norm, convention, momentum, epsilon, num_classes, seed, bn_kwargs)
    if arch.resize_to is None:
        input_shape = _check_input_shape(input_shape)
    else:
        input_shape = _check_input_shape(input_shape, min_spatial=1)  # the resize makes any size fit

    seeds = iter(range(seed, seed + 5)) if seed is not None else None

    def weights() -> dict[str, keras.initializers.Initializer]:
        # A fresh initializer per layer: one seeded instance reused would give equal kernels.
        init = {"kernel_initializer": keras.initializers.GlorotUniform(seed=next(seeds) if seeds is not None else None)}
        if arch.bias_fill is not None:
            init["bias_initializer"] = keras.initializers.Constant(arch.bias_fill)
        return init

    def activation(index: int) -> keras.Layer:
        if arch.activation == "relu":  # the ReLU layer, as LeNet-BN always had (saved models keep loading)
            return keras.layers.ReLU(name=f"relu{index}")
        return keras.layers.Activation(arch.activation, name=f"{arch.activation}{index}")

    def block(x, index: int, trunk: keras.Layer):
        x = trunk(x)
        if batch_norm is not None:
            x = _make_batch_norm(batch_norm, f"bn{index}", convention or "keras", momentum, epsilon, bn_kwargs)(x)
        return activation(index)(x)

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if arch.resize_to is not None:
        x = BilinearResize(*arch.resize_to, name="resize")(x)
    x = block(x, 1, keras.layers.Conv2D(6, 5, padding="valid", **weights(), name="conv1"))
    x = arch.pooling(2, name="pool1")(x)
    x = block(x, 2, keras.layers.Conv2D(16, 5, padding="valid", **weights(), name="conv2"))
    x = arch.pooling(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = block(x, 3, keras.layers.Dense(120, **weights(), name="fc1"))
    x = block(x, 4, keras.layers.Dense(84, **weights(), name="fc2"))
    logits = keras.layers.Dense(num_classes, **weights(), name="fc3")(x)
    name = arch.name if batch_norm is None else f"{arch.name}_bn_{batch_norm}"
    return keras.Model(inputs, logits, name=name)


def lenet_bn(
    batch_norm: str | None = "ours",
    convention: str = "keras",
    momentum: float | None = None,
    epsilon: float | None = None,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    **bn_kwargs: Any,
) -> keras.Model:
    """Build LeNet-BN (logits out, no softmax) as a functional ``keras.Model``.

    44,878 trainable parameters and 452 moving statistics with BN, 44,426 parameters without.

    Args:
        batch_norm: ``"ours"`` (:class:`keras_bn.BatchNorm`), ``"keras"``
            (``keras.layers.BatchNormalization``) or ``None`` (the same net without BN layers).
        convention: moving-statistics convention of ``keras_bn.BatchNorm`` (any ``spec``
            convention); must stay ``"keras"`` for the built-in layer.
        momentum, epsilon: passed to the BN layers when not None (else each layer's default,
            which for ``"ours"`` is the convention's default).
        input_shape: (height, width, channels), channels last, height and width >= 16.
        num_classes: width of the logits layer ``fc3``.
        seed: makes the kernel initialization deterministic (Glorot uniform with seeds
            ``seed, seed + 1, ...`` per layer); biases, gamma and beta start at 0/1/0 anyway.
        **bn_kwargs: further BN arguments (``center``, ``renorm``, ``stats_update`` ...).
    """
    if batch_norm is None and convention == "keras":
        convention = None  # the default says nothing; any other value is an error without BN layers
    return _build(_LENET_BN, batch_norm, convention, momentum, epsilon, input_shape, num_classes, seed, bn_kwargs)


def d2l_lenet_bn(
    batch_norm: str | None = "ours",
    convention: str | None = None,
    momentum: float | None = None,
    epsilon: float | None = None,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    **bn_kwargs: Any,
) -> keras.Model:
    """d2l's LeNet-BN: :func:`lenet_bn`'s shapes with sigmoid activations and 2x2 average pooling.

    Same counts as :func:`lenet_bn` (44,878 trainable + 452 moving statistics; 44,426 without BN).
    ``convention=None`` means ``"d2l"`` for our layer (the chapter's from-scratch BN: momentum 0.9 on
    the *new* value, biased variance, eps 1e-5) and ``"keras"`` for the built-in one (the chapter's
    "concise" framework version). Other arguments as :func:`lenet_bn`.
    """
    return _build(_D2L, batch_norm, convention, momentum, epsilon, input_shape, num_classes, seed, bn_kwargs)


def lenet5(
    batch_norm: str | None = "ours",
    convention: str | None = None,
    momentum: float | None = None,
    epsilon: float | None = None,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    **bn_kwargs: Any,
) -> keras.Model:
    """LeNet-5 (Paperspace article): bilinear resize to 32x32, tanh, average pooling, 400 -> 120 -> 84 -> 10.

    Kernels Glorot (Xavier) uniform, seeded as in :func:`lenet_bn`; biases filled with 0.01. Parameters
    without BN: conv1 156 + conv2 2,416 + fc1 48,120 + fc2 10,164 + fc3 850 = 61,706; BN adds 452
    trainable (gamma, beta) and 452 moving statistics. Any ``input_shape`` (H, W, C) works: the
    ``resize`` layer brings it to 32x32. ``convention=None`` means ``"keras"``. Other arguments as
    :func:`lenet_bn`.
    """
    return _build(_LENET5, batch_norm, convention, momentum, epsilon, input_shape, num_classes, seed, bn_kwargs)


#: Builder per model name (the names of ``keras-bn run --model``).
BUILDERS = {"lenet-bn": lenet_bn, "d2l-lenet-bn": d2l_lenet_bn, "lenet5": lenet5}


def compile_lenet(
    model: keras.Model,
    optimizer: str | keras.optimizers.Optimizer = "sgd",
    lr: float | keras.optimizers.schedules.LearningRateSchedule = 0.1,
    momentum: float = 0.9,
    **compile_kwargs: Any,
) -> keras.Model:
    """Compile for integer labels and logits: SparseCategoricalCrossentropy(from_logits=True), accuracy.

    ``optimizer`` is ``"sgd"`` (with ``momentum``), ``"adam"`` or a Keras optimizer instance
    (then ``lr`` and ``momentum`` are ignored); ``lr`` may be a learning-rate schedule.
    Returns the model for chaining.
    """
    if isinstance(optimizer, str):
        if optimizer == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
        elif optimizer == "adam":
            optimizer = keras.optimizers.Adam(learning_rate=lr)
        else:
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a keras.optimizers.Optimizer, got {optimizer!r}")
    elif not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be 'sgd', 'adam' or a keras.optimizers.Optimizer, got {type(optimizer)}")
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return model
