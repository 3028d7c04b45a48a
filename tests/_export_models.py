"""Trained-ish LeNet-BN pairs and their ONNX exports, built once per test session for the export tests.

"Trained-ish": seeded LeNet-BN fitted for one short epoch on the embedded digits (22 SGD steps), so
weights and moving statistics are far from their initial values (a freshly built BN has mean 0,
var 1, gamma 1, beta 0, which would hide a swapped or ignored statistic). Cached with
functools.cache rather than session fixtures so every tests/test_export_*.py module shares one copy.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

#: flavour -> (keras_bn.lenet_bn batch_norm, torch_ref.lenet_bn batch_norm)
FLAVOURS = {
    "ours": ("ours", "ours"),  # keras_bn.BatchNorm (TF fused kernel) and torch_ref.BatchNorm*d
    "builtin": ("keras", "torch"),  # keras.layers.BatchNormalization and torch.nn.BatchNorm*d
}

_TMP = Path(tempfile.mkdtemp(prefix="keras_bn_export_tests_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Embedded digits as float32 NHWC images and labels (the test split)."""
    from mnist_data import load_dataset, to_nhwc_float

    data = load_dataset("digits")
    return to_nhwc_float(data.x_test), data.y_test


@functools.cache
def trained_pair(flavour: str):
    """(keras_model, torch_model) with identical trained weights."""
    import keras

    import keras_bn
    import torch_ref
    from mnist_data import load_dataset, to_nhwc_float

    keras_kind, torch_kind = FLAVOURS[flavour]
    keras.utils.set_random_seed(20261121)
    data = load_dataset("digits")
    model = keras_bn.compile_lenet(keras_bn.lenet_bn(keras_kind, seed=7), lr=0.05)
    model.fit(to_nhwc_float(data.x_train), data.y_train, batch_size=64, epochs=1, verbose=0, shuffle=False)
    torch_model = torch_ref.lenet_bn(torch_kind)
    torch_ref.keras_to_torch(model, torch_model)
    return model, torch_model


@functools.cache
def exported(flavour: str) -> dict[str, Path]:
    """The four ONNX forms of :func:`trained_pair`, form -> path."""
    from export.onnx.exporters import export_all

    keras_model, torch_model = trained_pair(flavour)
    return export_all(keras_model, torch_model, _TMP / flavour)


@functools.cache
def raw_keras_export(flavour: str):
    """The untouched ``keras.Model.export(format="onnx")`` output (tf2onnx), as a ModelProto."""
    import onnx
    import tensorflow as tf

    model, _ = trained_pair(flavour)
    path = _TMP / f"{flavour}_raw.onnx"
    spec = [tf.TensorSpec((None, 28, 28, 1), tf.float32, name="images")]
    model.export(str(path), format="onnx", verbose=False, input_signature=spec, opset_version=18)
    return onnx.load(path)
