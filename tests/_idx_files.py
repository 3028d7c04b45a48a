"""IDX files written by hand for the data-loading tests (test_data.py, test_cli.py).

The encoding is built here from the format's definition (LeCun's MNIST page: big-endian magic
0x0000 08 ndim, then the sizes, then uint8 data), independently of mnist_data's reader.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from mnist_data import IDX_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """Hand-built IDX encoding (independent of the reader): big-endian magic 0x0000 08 ndim, sizes, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, rng: np.random.Generator, *, n_train: int = 12, n_test: int = 5, gz: bool) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, array in arrays.items():
        payload = idx_bytes(array)
        if gz:
            (directory / f"{IDX_FILES[role]}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / IDX_FILES[role]).write_bytes(payload)
    return arrays
