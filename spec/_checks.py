"""Input validation shared by every spec function.

Each check raises ``ValueError`` whose message names the offending argument, so a
caller porting a model sees *what* is wrong, not a broadcasting error three calls deep.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

# bfloat16 comes from ml_dtypes (shipped with TensorFlow/JAX) and is not a NumPy
# "floating" subtype, so it is recognised by name.
_EXTRA_FLOAT_NAMES = frozenset({"bfloat16"})


def is_float_dtype(dtype: np.dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name in _EXTRA_FLOAT_NAMES


def as_float_array(x, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray, refusing non-float data instead of silently casting."""
    arr = np.asarray(x)
    if not is_float_dtype(arr.dtype):
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return arr


def channel_axis(x: np.ndarray, axis: int) -> int:
    """Validate rank and channel axis; return the axis as a non-negative index."""
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 (batch and channel axes), got rank {x.ndim} with shape {x.shape}")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise ValueError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of rank {x.ndim} (shape {x.shape})")
    return int(axis) % x.ndim


def per_channel(value, name: str, channels: int) -> np.ndarray:
    """A per-channel parameter must be a vector of exactly ``channels`` values."""
    arr = as_float_array(value, name)
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) to match the channel axis, got {arr.shape}")
    return arr


def real_number(value, name: str) -> float:
    """A scalar hyperparameter: a Python or NumPy real number; bool, text and arrays are refused.

    ``numbers.Real`` covers int, float, ``np.floating`` and ``np.integer``; bool is an int
    subclass in Python, but ``eps=True`` is a bug, not 1.0.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def positive_eps(eps: float, name: str = "eps") -> float:
    """``eps`` is added to a variance before its square root (SPEC.md §1): a finite real > 0.

    ``name`` is the argument's name in the caller's API (Keras calls it ``epsilon``), so the message
    names what the user passed.
    """
    eps = real_number(eps, name)
    if not (eps > 0.0 and math.isfinite(eps)):  # the comparison also rejects NaN
        raise ValueError(f"{name} must be > 0 and finite, got {eps}")
    return eps


def non_negative_variance(var: np.ndarray, name: str) -> None:
    if np.any(var < 0):
        raise ValueError(f"{name} must be >= 0 in every channel, got min {np.nanmin(var)}")


def non_negative_counts(count, name: str) -> np.ndarray:
    """Counts of values (float64, a mask makes them fractional) must be finite and >= 0."""
    count = np.asarray(count)
    if count.dtype.kind not in "iuf" or count.dtype == np.bool_:
        raise ValueError(f"{name} must be a number or an array of numbers, got dtype {count.dtype}")
    count = count.astype(np.float64)
    if not np.all(np.isfinite(count)):
        raise ValueError(f"{name} must be finite, got {count}")
    if np.any(count < 0):
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


def batch_counter(value, name: str = "num_batches_tracked") -> int:
    """A number of batches: an integer >= 0 (anything with ``__index__``: int, NumPy or 0-d torch integers).

    ``int(1.5)`` would silently truncate, so floats are refused rather than converted.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def mask_weights(mask) -> np.ndarray:
    """A mask's weights (bool or numbers) must be finite and >= 0: they are counts of values (SPEC.md §2)."""
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"mask must hold booleans or numbers, got dtype {mask.dtype}")
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)):
            raise ValueError("mask weights must be finite, got NaN or Inf")
    if mask.dtype.kind in "if" and np.any(mask < 0):
        raise ValueError(f"mask weights must be >= 0, got min {mask.min()}")
    return mask
