"""Record once, replay many: spec's op sequence for one configuration, run by TorchScript's interpreter.

torch_ref computes BN with spec's namespace-generic formulas (one formula, one place). Eagerly that is ~60 ATen
calls per training step issued from Python, with Python between them (namespace dispatch, in-place and layout
checks): on LeNet's 64x120 layer ~280 us per step where the ATen kernels themselves take ~130 us. For a given
configuration those Python decisions never change: they read only shapes, strides, dtypes and Python constants
(eps, the channel dim), so the op sequence never changes either. :class:`Recorder` records it once with
``torch.jit.trace`` and replays it in TorchScript's C++ interpreter: the same ATen kernels on the same operands
in the same order, so the same bits (tests/test_torch_replay.py), like a CUDA graph's capture and replay.
torch_ref records a training step's forward with its moving-statistics update (which writes the buffers, so the
recording runs on copies of them) and its backward.

The key a caller gives must hold everything the recorded Python read. Data must not steer it: spec's one
data-dependent branch, :meth:`spec.arrays.Namespace.cond` (``refine="when_needed"``), and its predicate
:meth:`~spec.arrays.Namespace.any` refuse to be recorded (:data:`RECORDING`), and a configuration that cannot
be recorded keeps spec's eager path. Replays run only where that path would run the same plain ops: CPU tensors,
nothing recording autograd or tracing, and TorchScript's CPU fuser off (a fused kernel may round differently).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

import spec.arrays


class DataDependentBranch(RuntimeError):
    """Raised while recording where spec's formulas would branch on tensor values (not recordable)."""


class _RecordingNamespace(spec.arrays.Namespace):
    """``Namespace(torch, plain_tensors=True)`` that refuses the operations whose outcome depends on data."""

    def cond(self, predicate, true_fn, false_fn):
        raise DataDependentBranch("spec branches on tensor values here; a recording would bake one branch in")

    def any(self, x):
        raise DataDependentBranch("spec tests tensor values here; a recording would bake the answer in")


#: the namespace spec's formulas run on while :class:`Recorder` records them
RECORDING = _RecordingNamespace(torch, plain_tensors=True)


#: whether TorchScript may fuse CPU kernels (off unless a user turns it on); a torch without the query: assume so
_cpu_fuser_on = getattr(torch._C, "_jit_can_fuse_on_cpu", lambda: True)


#: set inside :func:`op_by_op`
_op_by_op = False


def allowed(x: torch.Tensor) -> bool:
    """Whether a replay may stand in for spec's plain eager path on ``x`` (the caller has checked the namespace is
    plain: no autograd recording, no ``torch.compile``, no ``torch.func`` transform)."""
    # torch._C._is_tracing(): torch.jit.is_tracing()'s own test outside TorchScript (we are in Python), without its
    # two Python calls; this runs twice per training step
    return not _op_by_op and x.is_cpu and not torch._C._is_tracing() and not _cpu_fuser_on()


@contextlib.contextmanager
def op_by_op() -> Iterator[None]:
    """Inside, no replay: spec's formulas run one ATen op at a time from Python, the same ops in the same order. The
    reference a replay must equal bit for bit (tests/test_torch_replay.py) and what profiling compares it with
    (bench/profile_torch_bn.py)."""
    global _op_by_op
    previous, _op_by_op = _op_by_op, True
    try:
        yield
    finally:
        _op_by_op = previous


class Recorder:
    """Replays by configuration key, recorded on first use; at most ``limit`` kept (the oldest recorded goes)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._replays: dict[tuple, Any] = {}
        self._recording = threading.Lock()

    def __call__(
        self, key: tuple, function: Callable[..., Any], tensors: list[torch.Tensor] | Callable[[], list[torch.Tensor]]
    ):
        """The replay of ``function(*tensors)`` for ``key`` (a ``torch.jit.ScriptFunction``), or None where
        ``function`` cannot be recorded (the caller then runs it eagerly). ``function`` must take the tensors
        positionally and run spec's formulas on :data:`RECORDING`. ``tensors`` may be a function that makes
        them, called only to record: recording runs ``function``, so one that writes into its inputs must be
        recorded on copies."""
        try:
            return self._replays[key]
        except KeyError:
            pass
        # one recording at a time: warnings.catch_warnings swaps process-wide filters, so two threads recording at
        # once would let each other's TracerWarnings through (a recording happens once per configuration)
        with self._recording:
            if key in self._replays:
                return self._replays[key]
            try:
                with warnings.catch_warnings():
                    # torch 2.13 deprecates jit.trace; its TracerWarnings flag Python reading sizes, which the key fixes
                    warnings.simplefilter("ignore")
                    examples = tensors() if callable(tensors) else tensors
                    replay = torch.jit.trace(function, tuple(examples), check_trace=False)
            except Exception:  # noqa: BLE001 - DataDependentBranch, or what this torch's tracer lacks: eager path
                replay = None
            if len(self._replays) >= self.limit:
                self._replays.pop(next(iter(self._replays)))
            self._replays[key] = replay
            return replay

    def __len__(self) -> int:
        return len(self._replays)

    def clear(self) -> None:
        self._replays.clear()
