"""MNIST-layout image data: MNIST and Fashion-MNIST from IDX or Keras ``.npz`` files, a verified download cache, and
the offline default (scikit-learn's 8x8 digits upscaled to 28x28). Loaders and format details: :mod:`.loaders`.

Used by ``keras-bn run``, the benchmarks and the tests alike, so it is a package of its own rather than part of
``export``. Nothing is downloaded unless asked (``download=True``).
"""

from mnist_data.loaders import (
    DATASET_NAMES,
    DATASETS,
    IDX_FILES,
    DataError,
    Dataset,
    default_cache_dir,
    download_dataset,
    load_dataset,
    load_digits_28,
    read_idx,
    to_nchw_float,
    to_nhwc_float,
)

__all__ = [
    "DATASET_NAMES",
    "DATASETS",
    "IDX_FILES",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "download_dataset",
    "load_dataset",
    "load_digits_28",
    "read_idx",
    "to_nchw_float",
    "to_nhwc_float",
]
