"""Shared fixtures: deterministic seeds, the shared MNIST data, quiet TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Threads are fixed once, before TensorFlow initializes (it refuses changes afterwards, so a
# per-module setting fails whenever another module ran TF first). TF and torch share 2 cores
# in one process; the tensors under test are small, so one intra-op thread each is fastest and
# keeps reductions deterministic. Subprocess workers inherit these variables.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
# Which path BatchNorm(fused=None) trains on must not depend on timing in tests: the fixed rule, also the
# library's default (keras_bn/tuning.py; tests/test_layer_tuning.py checks the measuring logic with stubbed times).
os.environ.setdefault("KERAS_BN_FUSED", "rule")


def pytest_configure(config: pytest.Config) -> None:
    """PyTorch's thread count, like TensorFlow's above, is set once for the whole run."""
    try:
        import torch
    except ImportError:  # torch is an optional extra
        return
    torch.set_num_threads(1)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)


def _canonical_data(subdir: str, display: str) -> Path:
    """The canonical IDX files of one dataset (CI has them beside the checkout, users may not)."""
    path = SHARED_DATA / subdir
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        # CI always has ../shared/data: there a missing file is a failure, never a quiet skip.
        if os.environ.get("CI") == "true":
            pytest.fail(f"canonical {display} not found at {path} (CI must provide ../shared/data)")
        pytest.skip(f"canonical {display} not found at {path}")
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The canonical MNIST IDX files: a failure in CI when missing, a skip elsewhere."""
    return _canonical_data("mnist", "MNIST")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The canonical Fashion-MNIST IDX files, with mnist_dir's rule."""
    return _canonical_data("fashion", "Fashion-MNIST")


@pytest.fixture(scope="module", autouse=True)
def _report_peer_errors(request: pytest.FixtureRequest):
    """A module that records its errors against peers in a ``PEERS`` (tests/_peer_errors.py) prints the
    largest ones after its last test (``pytest -s``), so a closing note can quote them."""
    yield
    peers = getattr(request.module, "PEERS", None)
    if peers is not None:
        print(peers.report())


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The canonical MNIST test set, (images uint8 (10000, 28, 28), labels), read once per session.

    Shared by every test that needs it: treat the arrays as read-only.
    """
    from mnist_data import load_dataset  # the project's loader, itself checked by test_data.py

    data = load_dataset("mnist", data_dir=mnist_dir)
    return data.x_test, data.y_test
