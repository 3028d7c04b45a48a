"""The few array operations spec's formulas need, for NumPy, ``keras.ops`` and ``torch``.

spec's formulas take an array namespace ``xp`` (the module: ``numpy``, ``keras.ops`` or
``torch``), so the Keras layer runs them on Keras tensors and torch_ref on torch tensors, and
the NumPy reference runs the very same code in float64. Only the differences live here:
torch's ``maximum`` takes no Python scalar, NumPy has no ``rsqrt``, and torch fuses ``x * a + b``
(``torch.addcmul``) and may overwrite a temporary the caller no longer needs (:meth:`Namespace.multiply_add`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np


class Namespace:
    """The operations spec's formulas use, each spelled for one module (numpy, keras.ops, torch)."""

    def __init__(self, xp: ModuleType, *, plain_tensors: bool = False) -> None:
        """``plain_tensors=True`` (torch only): the caller guarantees that every tensor it passes is a plain tensor
        (no ``torch.func`` or batched wrapper) and that autograd is not recording and ``torch.compile`` not tracing,
        having checked that once per call (torch_ref does, per forward and backward); in-place reuse then needs
        only shape and dtype, not the per-operation checks of :meth:`_may_overwrite`."""
        if plain_tensors and xp.__name__ != "torch":
            raise ValueError(f"plain_tensors=True is for torch, not {xp.__name__}")
        self.xp = xp
        self.name = xp.__name__
        self.plain_tensors = plain_tensors

    def sum(self, x, axis, keepdims: bool = False):
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def where(self, condition, a, b):
        """``a`` where ``condition`` holds, else ``b``; a Python bool (a condition known on the host, such as a
        count from static shapes) picks one operand without an array operation."""
        if isinstance(condition, bool):
            return a if condition else b
        return self.xp.where(condition, a, b)

    def cast(self, x, dtype):
        """``x`` in ``dtype``: the module's dtype object (``t.dtype`` of another array) or a name ("float64")."""
        if self.name == "torch":
            return x.to(getattr(self.xp, dtype) if isinstance(dtype, str) else dtype)
        if self.xp is np:
            return np.asarray(x).astype(dtype, copy=False)
        return self.xp.cast(x, dtype)

    def asarray(self, value: float, dtype):
        """A Python number as a 0-d array of ``dtype``, rounded once, to that dtype: ``keras.ops.cast`` would make
        a float32 tensor of it first on TensorFlow (0.1 -> 0.10000000149, 1e-8 off in a float64 update)."""
        if self.name == "torch":
            return self.xp.tensor(value, dtype=getattr(self.xp, dtype) if isinstance(dtype, str) else dtype)
        if self.xp is np:
            return np.asarray(value, dtype=dtype)
        return self.xp.convert_to_tensor(value, dtype=dtype)

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

    def multiply_add(self, x, a, b, *, overwrite: str | None = None):
        """``x * a + b`` (broadcasting), fused where the module can; ``overwrite`` ("x" or "b") names an
        x-sized temporary the caller no longer needs, which torch then reuses for the result.

        Why: on a CPU an x-sized allocation costs several times the arithmetic of an in-place op, and
        BN's forward and backward are a few such passes. NumPy and keras.ops evaluate the plain
        expression (NumPy: the very float64 operations the golden vectors pin). torch overwrites only
        where autograd is not recording (in place would break a graph being built) and the named
        operand already has the result's shape; otherwise ``torch.addcmul(b, x, a)``, one allocation.
        """
        if self.name != "torch":
            return x * a + b
        torch = self.xp
        if not all(isinstance(t, torch.Tensor) for t in (x, a, b)):
            return x * a + b
        if overwrite is not None and self._may_overwrite(x if overwrite == "x" else b, (x, a, b)):
            tiled = self._channel_tiles(x, (x, a, b))
            if tiled is not None:  # the same in place operations on wider rows, written into x's (or b's) memory
                xt, at, bt = tiled
                xt.mul_(at).add_(bt) if overwrite == "x" else bt.addcmul_(xt, at)
                return x if overwrite == "x" else b
            return x.mul_(a).add_(b) if overwrite == "x" else b.addcmul_(x, a)
        return torch.addcmul(b, x, a)

    def multiply(self, x, y, *, overwrite: bool = False):
        """``x * y``; ``overwrite=True``: ``x`` is an x-sized temporary the caller no longer needs, which torch
        then writes the product into (where :meth:`multiply_add` would overwrite). ``result is x`` says it did.

        Why: a fresh x-sized buffer costs its page faults (a 51 MB one ~20 ms on a CPU, ten passes of
        arithmetic over it), so where the caller can form ``x`` again from its inputs that is cheaper.
        """
        if overwrite and self.name == "torch" and self._may_overwrite(x, (x, y)):
            return x.mul_(y)
        return x * y

    def subtract(self, x, y, *, out=None):
        """``x - y``, written into ``out`` (a buffer :meth:`multiply` overwrote; torch only) where given."""
        tiled = self._channel_tiles(x, (x, y) if out is None else (x, y, out))
        if tiled is not None:
            if out is None:
                return (tiled[0] - tiled[1]).view(x.shape)
            self.xp.sub(tiled[0], tiled[1], out=tiled[2])
            return out
        if out is None:
            return x - y
        return self.xp.sub(x, y, out=out)

    def _channel_tiles(self, x, operands):
        """``operands`` as 2-D rows of ``k * C`` values, or None: for channels-last ``x`` with few channels C.

        Why: an elementwise op whose per-channel operand varies along x's innermost dim loops over rows of C values,
        too short to vectorize (ATen on 64x24x24x6 float32, 2 threads: ``x - shift`` 86 us, 15 us on rows of 384,
        plus ~5 us to repeat the vector). Viewing x
        as ``(m / k, k * C)`` and repeating each per-channel vector k times gives every element the same operands,
        so the results are bit for bit the same. Only for :attr:`plain_tensors` (no autograd, no transforms): the
        caller has checked that views and in-place writes are safe. x-sized operands must be contiguous like x.
        """
        if not self.plain_tensors or x.dim() < 2 or not x.is_contiguous():
            return None
        channels, shape = x.shape[-1], x.shape
        if channels >= _FEW_CHANNELS or channels == 0:
            return None
        rows = x.numel() // channels
        k = 1
        while k * channels < _WIDE_ROW and rows % (2 * k) == 0:
            k *= 2
        if k * channels < _WIDE_ROW // 4:  # too few rows divide evenly: not worth a copy of the vectors
            return None
        whole = []  # every operand is checked before any view is made: a refusal costs no ATen call
        for operand in operands:
            if operand.shape == shape and operand.is_contiguous():
                whole.append(True)
            elif operand.numel() == channels and operand.dim() <= x.dim() and operand.shape[-1] == channels:
                whole.append(False)
            else:  # e.g. NCHW x, whose last dim is a width, with a (1, C, 1, 1) vector
                return None
        width = k * channels
        return [
            # a vector: expand + reshape, one copy, 10 ATen calls where repeat makes 31 (5 vs 10 us)
            operand.view(-1, width) if is_whole else operand.reshape(1, channels).expand(k, channels).reshape(width)
            for operand, is_whole in zip(operands, whole, strict=True)
        ]

    def _may_overwrite(self, target, operands) -> bool:
        """torch: whether ``target`` may be written in place with the broadcast of ``operands``."""
        torch = self.xp
        if self.plain_tensors:
            return _holds_result(target, operands)
        return (
            all(isinstance(t, torch.Tensor) for t in operands)
            and not torch.is_grad_enabled()
            and _holds_result(target, operands)
            and not _functorch_wrapped(torch, operands)
        )

    def full_like(self, x, value):
        """An array shaped and typed like ``x`` filled with ``value`` (a number or a scalar tensor)."""
        return np.full_like(x, value) if self.xp is np else self.xp.ones_like(x) * value

    def values_per_channel(self, x, axes):
        """The number of values per channel, the product of x's sizes on ``axes`` (dynamic under a trace)."""
        if self.name == "keras.ops":  # a traced batch size is unknown until run time
            # lists, not generators, throughout: TorchDynamo cannot trace a generator inside an autograd.Function
            kept = [d for a, d in enumerate(x.shape) if a not in axes]
            if None not in kept:
                return self.xp.cast(self.xp.size(x), x.dtype) / math.prod(kept)
            # a trace that does not know the channel count either: the product of the reduced sizes at run time
            sizes = self.xp.shape(x)
            count = 1
            for a in axes:
                count = count * sizes[a]
            return self.xp.cast(count, x.dtype)
        return float(math.prod([x.shape[a] for a in axes]))

    def abs(self, x):
        return self.xp.abs(x)

    def any(self, x):
        """Whether any element is true, as the module's scalar (a traced boolean under a trace)."""
        return self.xp.any(x)

    def cond(self, predicate, true_fn: Callable[[], object], false_fn: Callable[[], object]):
        """``true_fn()`` if ``predicate`` else ``false_fn()``: a traced conditional for keras.ops (``tf.cond``,
        ``lax.cond``), so a compiled graph runs only the branch it needs; Python's ``if`` for NumPy and torch."""
        if self.name == "keras.ops":
            return self.xp.cond(predicate, true_fn, false_fn)
        return true_fn() if bool(predicate) else false_fn()

    def sum_in_branch(self, x, axis: tuple[int, ...]):
        """``sum(x, axis, keepdims=True)`` inside a :meth:`cond` branch that should stay conditional once compiled.

        TensorFlow's XLA (``ConditionalSimplifier``) deems a branch of reductions and elementwise ops cheap and
        rewrites the conditional into a ``select`` that always computes both branches; a matrix-vector product
        is not deemed cheap. So on the TensorFlow backend, with the channel axis last, the sum over every other
        axis is ``ones(1, m) @ x.reshape(m, C)`` (the same sum, another summation order). JAX keeps a
        ``lax.cond`` of a plain reduction (measured: bench/xla_cost.py), and NumPy and torch branch in Python.
        """
        ndim = len(x.shape)
        if self.name != "keras.ops" or tuple(axis) != tuple(range(ndim - 1)) or not _keras_backend_is("tensorflow"):
            return self.sum(x, axis, keepdims=True)
        rows = self.xp.reshape(x, (-1, x.shape[-1]))
        ones = self.xp.ones((1, self.xp.shape(rows)[0]), dtype=rows.dtype)
        return self.xp.reshape(self.xp.matmul(ones, rows), (1,) * (ndim - 1) + (x.shape[-1],))

    def unit_roundoff(self, x) -> float:
        """``u``, half the spacing of 1.0 in x's dtype (2**-24 for float32): a rounded result is within ``u``
        relative of the exact one."""
        if self.name == "torch":
            return self.xp.finfo(x.dtype).eps / 2
        dtype = str(np.dtype(x.dtype)) if self.xp is np else _keras_dtype(x.dtype)
        return _UNIT_ROUNDOFF[dtype]

    def expm1(self, x):
        return self.xp.expm1(x)

    def log1p(self, x):
        return self.xp.log1p(x)


#: :meth:`Namespace._channel_tiles`: below this many channels a row of C values is shorter than an AVX-512 vector
#: of float32 and tiling pays for its repeated vectors (~5 us each: measured at 6 channels 3.4x faster, 16 even,
#: 32 and the 2-D 84 and 120 slower); rows are then widened to at least ``_WIDE_ROW`` values
_FEW_CHANNELS = 16
_WIDE_ROW = 256

#: 2**-(significand bits), by dtype name (NumPy's finfo knows no bfloat16)
_UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}


def _keras_dtype(dtype) -> str:
    """A backend tensor's dtype as NumPy's name ("float32"), via Keras' own mapping."""
    import keras  # only reached with xp=keras.ops

    return keras.backend.standardize_dtype(dtype)


def _keras_backend_is(name: str) -> bool:
    import keras  # only reached with xp=keras.ops

    return keras.backend.backend() == name


def _holds_result(target, operands) -> bool:
    """Whether the broadcast of ``operands`` has ``target``'s shape and dtype, so it can be written in place.

    By hand: ``torch.broadcast_shapes`` costs ~100 us in Python, more than the op it would guard; an
    operand of the target's own shape (the common case) is settled by one comparison.
    """
    shape, dtype, ndim = target.shape, target.dtype, target.dim()
    for operand in operands:
        if operand.dtype != dtype:
            return False
        operand_shape = operand.shape
        if operand_shape == shape:
            continue
        lead = ndim - len(operand_shape)
        if lead < 0:
            return False
        for index, size in enumerate(operand_shape):
            if size != 1 and size != shape[lead + index]:
                return False
    return True


def _functorch_wrapped(torch, operands) -> bool:
    """Whether an operand is a ``torch.func`` or batched tensor (vmap, grad): in place is refused there when the
    target is batched on fewer levels than another operand (gradcheck's batched gradients), so stay out of place.
    TorchDynamo traces plain tensors and cannot call the check: under ``torch.compile`` it is False."""
    if torch.compiler.is_compiling():
        return False
    return wrapped_tensors(torch, operands)


def wrapped_tensors(torch, operands) -> bool:
    """:func:`_functorch_wrapped`'s test itself, for callers that have ruled out ``torch.compile`` (None operands
    are skipped): a ``torch.func`` wrapper, or a legacy batched tensor of gradcheck's batched-gradient check."""
    functorch = torch._C._functorch
    for t in operands:  # a loop, not any(generator): this runs several times per BN step
        if t is not None and (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t)):
            return True
    return False


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
