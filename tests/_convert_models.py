"""Shared helpers of the conversion tests: real images, float64 Keras, moved BN statistics, comparisons."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_data import load_dataset, to_nhwc_float


@contextlib.contextmanager
def floatx(dtype: str) -> Iterator[None]:
    """Build Keras layers in ``dtype`` (floatx and the global dtype policy, which caches floatx), then restore."""
    before, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(before)
        keras.config.set_dtype_policy(policy)


# Lockstep training (tests/test_convert_training.py, tests/test_convert_from_torch.py). Binary fractions:
# Keras' SGD casts its momentum, a Python float, to the variable's dtype, which on TensorFlow goes
# through float32 (0.9 becomes 0.89999998); 0.875 and 0.0625 are exact in both.
LR, MOMENTUM, BATCH = 0.0625, 0.875, 16


@functools.cache
def _digits():
    return load_dataset("digits")  # the embedded optdigits test split, upscaled to 28x28 once per session


def _resized(images: np.ndarray, size: int, channels: int, dtype: str) -> np.ndarray:
    """uint8 (n, 28, 28) as NHWC in [0, 1], resized bilinearly to ``size`` and tiled to ``channels``."""
    images = to_nhwc_float(images)
    if size != images.shape[1]:
        images = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (size, size)))
    return np.ascontiguousarray(np.repeat(images, channels, axis=-1).astype(dtype))


def digit_images(n: int, size: int, channels: int, dtype: str, *, offset: int = 0) -> np.ndarray:
    """``n`` real handwritten digits (the embedded optdigits set) as NHWC in [0, 1], resized and tiled."""
    return _resized(_digits().x_test[offset : offset + n], size, channels, dtype)


@functools.cache
def _mnist(data_dir: Path):
    return load_dataset("mnist", data_dir)


def mnist_images(data_dir: Path, n: int, size: int, dtype: str, *, offset: int = 0) -> np.ndarray:
    """``n`` MNIST test images (conftest's ``mnist_dir``) as NHWC RGB: tiled to 3 channels, resized to ``size``."""
    return _resized(_mnist(data_dir).x_test[offset : offset + n], size, 3, dtype)


def mnist_labels(data_dir: Path, n: int, *, offset: int = 0) -> np.ndarray:
    return _mnist(data_dir).y_test[offset : offset + n].astype(np.int64)


def digit_labels(n: int, *, offset: int = 0) -> np.ndarray:
    return _digits().y_test[offset : offset + n].astype(np.int64)


def move_statistics(model: keras.Model, images: np.ndarray, batches: int = 1) -> None:
    """Training-mode passes so every BN's moving statistics leave their initial 0/1."""
    for chunk in np.array_split(images, batches):
        model(chunk, training=True)


def torch_outputs(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(images)).numpy()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max |difference| relative to the output scale (max |expected|)."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def train_keras(model: keras.Model, images: np.ndarray, labels: np.ndarray, *, lr: float = LR) -> None:
    with floatx("float64"):  # the optimizer's learning rate and the loss take floatx's dtype, not the model's
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def train_torch(module: nn.Module, images: np.ndarray, labels: np.ndarray, *, lr: float = LR) -> None:
    # torch's SGD (buf = m*buf + g; w -= lr*buf) equals Keras' (v = m*v - lr*g; w += v) for a fixed lr.
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=MOMENTUM)
    module.train()
    for start in range(0, len(images), BATCH):
        x = torch.from_numpy(images[start : start + BATCH])
        y = torch.from_numpy(labels[start : start + BATCH])
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()


def worst_weight_difference(model: keras.Model, reference: keras.Model) -> float:
    """Max |difference| over every weight of two models of one graph, layer by layer in order.

    ``model`` may have fewer weights per layer (a plain Keras BN lacks keras_bn's batch counter).
    """
    worst = 0.0
    for layer, ref in zip(model.layers, reference.layers, strict=True):
        assert len(layer.weights) <= len(ref.weights), layer.name
        for weight, expected in zip(layer.weights, ref.weights, strict=False):
            diff = keras.ops.convert_to_numpy(weight) - keras.ops.convert_to_numpy(expected)
            worst = max(worst, float(np.abs(diff).max()))
    return worst


def plain_batch_norm(module: nn.Module, *, keep_eps: bool = True) -> nn.Module:
    """``module`` with every torch_ref BN replaced, in place, by a plain one of PyTorch's conventions.

    Weights, statistics and (``keep_eps``) eps are kept, so inference is unchanged; training (momentum,
    the running-variance estimator) follows PyTorch's defaults instead of the converted convention.
    ``keep_eps=False``: a converter that copies weights and statistics only (eps 1e-5 too).
    """
    import torch_ref

    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, torch_ref.BatchNorm1d | torch_ref.BatchNorm2d):
                kind = torch_ref.BatchNorm2d if isinstance(child, torch_ref.BatchNorm2d) else torch_ref.BatchNorm1d
                eps = child.eps if keep_eps else 1e-5
                plain = kind(child.num_features, eps=eps, dtype=child.running_mean.dtype)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return module


class _OneInput(nn.Module):
    """``forward(x)`` over a converted Keras model's ``forward(*inputs)`` (torch.onnx.export's dynamic shapes)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def onnx_exportable(model: keras.Model) -> nn.Module:
    """``torch_ref.from_keras(model)`` taking NCHW, its BNs plain (``plain_batch_norm``) so the exporter keeps
    them as BatchNormalization nodes (a convention-carrying BN exports as elementwise ops)."""
    from torch_ref import from_keras

    return _OneInput(plain_batch_norm(from_keras(model, channels_last=False)))
