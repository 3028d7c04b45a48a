"""pytest plugin (``-p _keras_peer_plugin``): run Keras' own BN tests on ``keras_bn.BatchNorm``.

Loaded by tests/test_keras_peer_suite.py into a pytest subprocess that collects the *installed*
``keras/src/layers/normalization/batch_normalization_test.py``. Before collection it replaces
``BatchNormalization`` in every namespace that file can reach it through (``keras.src.layers``,
which the file imports as ``layers``; the public ``keras.layers``; the defining module), and
refuses to run if a collected test module still sees Keras' own class.
"""

from __future__ import annotations

import keras
import pytest
from keras.src import layers as src_layers
from keras.src.layers.normalization import batch_normalization as keras_bn_module

import keras_bn

KERAS_CLASS = keras.layers.BatchNormalization
NAMESPACES = (keras.layers, src_layers, keras_bn_module)


def pytest_configure(config: pytest.Config) -> None:
    for namespace in NAMESPACES:
        namespace.BatchNormalization = keras_bn.BatchNorm
    config.addinivalue_line("markers", "requires_trainable_backend: Keras' own marker (all our backends train)")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    for item in items:
        seen = getattr(getattr(item.module, "layers", None), "BatchNormalization", None)
        if seen is not keras_bn.BatchNorm:
            raise pytest.UsageError(f"{item.nodeid}: the test module still sees {seen!r}, not keras_bn.BatchNorm")


def pytest_report_header(config: pytest.Config) -> str:
    return f"keras {keras.__version__} on {keras.backend.backend()}: BatchNormalization -> {keras_bn.BatchNorm!r}"
