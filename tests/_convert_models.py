"""Shared helpers of the conversion tests: real images, float64 Keras, moved BN statistics, comparisons."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import keras
import numpy as np
import torch

from export.data import load_dataset, to_nhwc_float


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


@functools.cache
def _digits():
    return load_dataset("digits")  # the embedded optdigits test split, upscaled to 28x28 once per session


def digit_images(n: int, size: int, channels: int, dtype: str, *, offset: int = 0) -> np.ndarray:
    """``n`` real handwritten digits (the embedded optdigits set) as NHWC in [0, 1], resized and tiled."""
    images = to_nhwc_float(_digits().x_test[offset : offset + n])
    if size != images.shape[1]:
        images = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (size, size)))
    return np.ascontiguousarray(np.repeat(images, channels, axis=-1).astype(dtype))


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
