"""Training semantics survive torch_ref.from_keras: Keras ``model.fit`` and a PyTorch loop stay in lockstep.

From identical weights (the converted module), 20 SGD steps with momentum on identical batches of
real digits, float64: every parameter and every running statistic agrees within 1e-9 (measured
~1e-14: the two frameworks differ only by float64 summation order). The model mixes Keras'
built-in BN (biased running variance, momentum 0.9 on the old value), ``keras_bn.BatchNorm`` in
the torch convention (unbiased, 0.1 on the new value) and in TF1's (unbiased, old value), with
non-default epsilons, so each part of the convention is exercised.

The check has power: a converter that copies BN weights and statistics but leaves eps, momentum
and the variance estimator at PyTorch's defaults (``naive``) misses it by orders of magnitude.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L
from torch import nn

import keras_bn
import torch_ref
from tests._convert_models import BATCH, digit_images, digit_labels, floatx, train_keras, train_torch
from torch_ref import from_keras

STEPS, SIZE = 20, 14
TOL = 1e-9  # the bound for float64; measured ~1e-14 (module docstring)


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    with floatx("float64"):
        inputs = keras.Input((SIZE, SIZE, 1))
        x = L.Conv2D(6, 3, strides=2, padding="same")(inputs)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-2)(x)
        x = L.ReLU()(x)
        x = L.DepthwiseConv2D(3, padding="same")(x)
        x = keras_bn.BatchNorm(convention="torch", momentum=0.1, epsilon=1e-4)(x)
        x = L.ReLU(max_value=6.0)(x)
        x = L.Flatten()(x)
        x = L.Dense(16)(x)
        x = keras_bn.BatchNorm(convention="tf1", momentum=0.8)(x)
        x = L.Activation("tanh")(x)
        return keras.Model(inputs, L.Dense(10)(x))


def _naive(module: nn.Module) -> nn.Module:
    """Copy of a converted module whose BNs keep weights and statistics but PyTorch's default conventions."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, torch_ref.BatchNorm1d | torch_ref.BatchNorm2d):
                plain = (torch_ref.BatchNorm2d if isinstance(child, torch_ref.BatchNorm2d) else torch_ref.BatchNorm1d)(
                    child.num_features, dtype=child.running_mean.dtype
                )
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return module


def _state(module: nn.Module) -> dict[str, np.ndarray]:
    """Parameters and running statistics (the batch counter is torch-only bookkeeping)."""
    return {k: v.detach().numpy() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def _worst_difference(converter) -> float:
    model = _model()
    images = digit_images(STEPS * BATCH, SIZE, 1, "float64")
    labels = digit_labels(STEPS * BATCH)
    module = converter(from_keras(model))
    before = _state(from_keras(model))
    train_torch(module, images, labels)
    train_keras(model, images, labels)
    expected, actual = _state(from_keras(model)), _state(module)
    assert expected.keys() == actual.keys()
    assert any(np.abs(expected[k] - before[k]).max() > 1e-3 for k in expected if "running_var" in k)  # stats moved
    return max(float(np.abs(expected[k] - actual[k]).max()) for k in expected)


@pytest.mark.slow
def test_fit_and_torch_loop_agree_after_20_steps() -> None:
    assert _worst_difference(lambda module: module) <= TOL


@pytest.mark.slow
def test_converter_without_conventions_fails_the_check() -> None:
    assert _worst_difference(_naive) > 1e3 * TOL
