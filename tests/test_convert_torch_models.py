"""Real PyTorch BN networks through keras_bn.from_torch: ResNet-18, MobileNetV2 (torchvision's), EfficientNet-B0.

ResNet-18 and MobileNetV2 are torchvision's definitions written as fixtures (tests/_torch_models.py,
checked here by torchvision's published parameter counts); EfficientNet-B0 is efficientnet-pytorch
0.7.1's, whose 49 BN layers carry TensorFlow's conventions (momentum 0.01, eps 1e-3) inside PyTorch,
with static 'same' padding (``ZeroPad2d`` + ``F.conv2d``) and a swish autograd Function.

Oracle: the PyTorch module itself; every BN's statistics are first moved by training-mode passes on
real MNIST digits (tiled to RGB, resized). Bounds (the issue's): float64 logits within 1e-9 of the
logit scale (the same float64 products summed in another order; measured in the module's report),
float32 within 1e-4 relative with identical argmax on 256 images, for the converted Keras model
and for ONNX Runtime on the module's exports (BN kept, BN folded by the exporter), both judged by
``export.agreement.compare_pair`` and by the strict relative error. Slow: seconds per model call.
"""

from __future__ import annotations

import copy
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from torch import nn

import keras_bn
from export.agreement import compare_pair
from export.onnx.exporters import export_torch
from export.runtimes import run_ort
from tests._convert_models import mnist_images, relative_error
from tests._torch_models import MobileNetV2, ResNet18, efficientnet_b0

F64_TOL, F32_TOL = 1e-9, 1e-4
F32_IMAGES, F64_IMAGES, MOVE_IMAGES = 256, 32, 32
# torchvision's published parameter counts at 1000 classes (its model documentation's "num_params").
TORCHVISION_PARAMETERS = {"resnet18": (ResNet18, 11_689_512), "mobilenet_v2": (MobileNetV2, 3_504_872)}

# name -> (constructor at 10 classes, input size, BN layers, {(momentum, eps)} of its BN layers)
MODELS = {
    "ResNet18-64": (lambda: ResNet18(10), 64, 20, {(0.1, 1e-5)}),
    "MobileNetV2-96": (lambda: MobileNetV2(10), 96, 52, {(0.1, 1e-5)}),
    "EfficientNetB0-64": (lambda: efficientnet_b0(10, 64), 64, 49, {(0.01, 1e-3)}),
}


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMETERS))
def test_fixture_parameter_count_matches_torchvision(name: str) -> None:
    constructor, published = TORCHVISION_PARAMETERS[name]
    assert sum(p.numel() for p in constructor(1000).parameters()) == published


class _Converted:
    """One model in float64 and float32 (same weights, statistics moved), each with its Keras conversion."""

    def __init__(self, name: str, data_dir: Path) -> None:
        constructor, self.size, self.bn_layers, self.bn_settings = MODELS[name]
        torch.manual_seed(0)
        self.module64 = constructor().double().train()
        with torch.no_grad():
            for chunk in np.array_split(self.images(data_dir, MOVE_IMAGES, "float64", offset=F32_IMAGES), 2):
                self.module64(chunk)
        self.module64.eval()
        self.module32 = copy.deepcopy(self.module64).float()
        self.keras64 = keras_bn.from_torch(self.module64, (3, self.size, self.size))
        self.keras32 = keras_bn.from_torch(self.module32, (3, self.size, self.size))

    def images(self, data_dir: Path, n: int, dtype: str, offset: int = 0) -> torch.Tensor:
        """NCHW for the module; ``_nhwc`` gives the Keras model's layout."""
        nhwc = mnist_images(data_dir, n, self.size, dtype, offset=offset)
        return torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def _torch_logits(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(chunk).numpy() for chunk in torch.split(x, 64)])


def _assert_agree(name: str, actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """The project's pair criterion (export.agreement) and the strict relative error, both within ``rtol``."""
    pair = compare_pair(name, actual, "torch", expected, rtol=rtol)
    assert pair.passed, pair
    assert relative_error(actual, expected) <= rtol


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, mnist_dir: Path) -> tuple[_Converted, Path]:
    return _Converted(request.param, mnist_dir), mnist_dir


@pytest.mark.slow
def test_batch_norm_layers_keep_their_conventions(converted) -> None:
    model, _ = converted
    layers = [layer for layer in model.keras64.layers if isinstance(layer, keras_bn.BatchNorm)]
    assert len(layers) == model.bn_layers
    settings = {(layer.convention, round(layer.momentum, 12), float(layer.epsilon)) for layer in layers}
    assert settings == {("torch", momentum, eps) for momentum, eps in model.bn_settings}


@pytest.mark.slow
def test_float64_agrees(converted) -> None:
    model, data_dir = converted
    x = model.images(data_dir, F64_IMAGES, "float64")
    expected = _torch_logits(model.module64, x)
    actual = keras.ops.convert_to_numpy(model.keras64(_nhwc(x)))
    assert relative_error(actual, expected) <= F64_TOL


@pytest.mark.slow
def test_float32_and_onnx_runtime_agree_on_256_images(converted, tmp_path: Path) -> None:
    model, data_dir = converted
    x = model.images(data_dir, F32_IMAGES, "float32")
    expected = _torch_logits(model.module32, x)
    actual = keras.ops.convert_to_numpy(model.keras32.predict(_nhwc(x), batch_size=64, verbose=0))
    _assert_agree("keras", actual, expected, F32_TOL)
    for fold in (False, True):
        path = export_torch(
            model.module32, tmp_path / f"model-{fold}.onnx", fold=fold, input_shape=(3,) + (model.size,) * 2
        )
        _assert_agree("ort-folded" if fold else "ort", run_ort(path, _nhwc(x), batch_size=64), expected, F32_TOL)
