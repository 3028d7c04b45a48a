"""The few array operations spec's formulas need, for NumPy, ``keras.ops`` and ``torch``.

spec's formulas take an array namespace ``xp`` (the module: ``numpy``, ``keras.ops`` or
``torch``), so the Keras layer runs them on Keras tensors and torch_ref on torch tensors, and
the NumPy reference runs the very same code in float64. Only the differences live here:
torch's ``maximum`` takes no Python scalar, NumPy has no ``rsqrt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np


class Namespace:
    """The operations spec's formulas use, each spelled for one module (numpy, keras.ops, torch)."""

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self.name = xp.__name__

    def sum(self, x, axis, keepdims: bool = False):
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def where(self, condition, a, b):
        return self.xp.where(condition, a, b)

    def sqrt(self, x):
        return self.xp.sqrt(x)

    def rsqrt(self, x):
        # NumPy has no rsqrt; 1 / sqrt is also what the float64 reference has always computed.
        return 1.0 / np.sqrt(x) if self.xp is np else self.xp.rsqrt(x)

    def maximum(self, x, floor: float):
        """Elementwise ``max(x, floor)`` with a Python number ``floor`` (torch.maximum wants two tensors)."""
        return self.xp.clamp(x, min=floor) if self.name == "torch" else self.xp.maximum(x, floor)

    def reshape(self, x, shape):
        return self.xp.reshape(x, shape)

    def full_like(self, x, value):
        """An array shaped and typed like ``x`` filled with ``value`` (a number or a scalar tensor)."""
        return np.full_like(x, value) if self.xp is np else self.xp.ones_like(x) * value

    def values_per_channel(self, x, axes):
        """The number of values per channel, the product of x's sizes on ``axes`` (dynamic under a trace)."""
        if self.name == "keras.ops":  # a traced batch size is unknown until run time
            channels = math.prod(d for a, d in enumerate(x.shape) if a not in axes)
            return self.xp.cast(self.xp.size(x), x.dtype) / channels
        return float(math.prod(x.shape[a] for a in axes))

    def expm1(self, x):
        return self.xp.expm1(x)

    def log1p(self, x):
        return self.xp.log1p(x)


_NAMESPACES: dict[str, Namespace] = {}


def namespace(xp: ModuleType | Namespace | None = None) -> Namespace:
    """The :class:`Namespace` of ``xp`` (``numpy`` when None); a Namespace is returned as is."""
    if isinstance(xp, Namespace):
        return xp
    xp = np if xp is None else xp
    if not hasattr(xp, "__name__") or not hasattr(xp, "sum"):
        raise ValueError(f"xp must be an array module such as numpy, keras.ops or torch, got {xp!r}")
    if xp.__name__ not in _NAMESPACES:
        _NAMESPACES[xp.__name__] = Namespace(xp)
    return _NAMESPACES[xp.__name__]


def identity(values):
    """The cross-replica sum of a single replica: the values themselves."""
    return values


#: A cross-replica sum: takes a list of per-channel arrays, returns their sums over all replicas
#: (``tf.distribute.ReplicaContext.all_reduce(SUM, ...)``, ``torch.distributed.all_reduce``).
AllReduceSum = Callable[[list], list]
