"""MNIST-layout image data: MNIST and Fashion-MNIST from IDX or Keras ``.npz`` files, a verified download cache, and
the offline default (scikit-learn's 8x8 digits upscaled to 28x28). Loaders and format details: :mod:`.loaders`.

Used by ``keras-bn run``, the benchmarks and the tests alike, so it is a package of its own rather than part of
``export``. Nothing is downloaded unless asked (``download=True``).
"""

from mnist_data import loaders
from mnist_data.loaders import *  # noqa: F403  (the public names, listed once: loaders.__all__)

__all__ = loaders.__all__
