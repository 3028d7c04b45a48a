"""Which path a ``BatchNorm(fused=None)`` training call takes: a fixed rule by default, or measured on this machine.

TensorFlow's fused kernel beats the generic ``keras.ops`` path on some CPUs and shapes and loses on
others (``_fused.pays_off`` states what was measured on one CPU). With ``KERAS_BN_FUSED=measure`` the
first training call for an input shape, dtype and device times both paths (forward + backward, a few
interleaved rounds, medians; ~2 s for a 64x56x56x64 batch on 2 cores) and keeps the faster; later calls
reuse the decision.

The default is the fixed rule, not the measurement: the two paths round differently (both within
SPEC.md §8.4), so a choice that depends on timing noise makes the same seed train differently from run
to run and machine to machine (measured: ``keras-bn run`` gave LeNet-BN 94.44% with the rule and 94.72%
with a measured choice). Speed is opt-in; reproducibility is the default.

When measuring, an unknown batch size is timed as :data:`UNKNOWN_BATCH`: the choice depends on the
layout and channel count, not on the batch size. Other unknown sizes fall back to the rule.

Overrides, strongest first: the layer's ``fused=True/False``; the environment variable
``KERAS_BN_FUSED`` = ``rule`` (default: ``_fused.pays_off``, no timing), ``measure``, ``always`` or
``never``. Reproducible runs: ``KERAS_BN_FUSED_CACHE=path.json`` keeps the
decisions on disk (read at first use, written after each measurement), so a second run takes the same
paths without timing anything. :func:`tune` measures explicitly, e.g. before a model is traced.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import tensorflow as tf

from keras_bn import _fused, _ops

MODE_VARIABLE = "KERAS_BN_FUSED"
CACHE_VARIABLE = "KERAS_BN_FUSED_CACHE"
MODES = ("measure", "rule", "always", "never")
UNKNOWN_BATCH = _ops.UNKNOWN_BATCH
_KERNEL_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS")  # part of a CPU decision's key when set
_EPSILON = 1e-3  # any eps: it does not change the time

_decisions: dict[str, bool] = {}
_cache_loaded: set[str] = set()
_lock = threading.RLock()  # tf.distribute traces replicas in parallel threads


def mode() -> str:
    """The ``KERAS_BN_FUSED`` setting, checked."""
    value = os.environ.get(MODE_VARIABLE, "rule").strip().lower()
    if value not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={value!r} is not one of {', '.join(MODES)}")
    return value


def device() -> str:
    """What the decision depends on besides the shape: the accelerator, or the CPU and its thread count."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU {details.get('device_name', gpus[0].name)}"
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    # On x86 the fused kernel is oneDNN's, whose code these variables change (bench/_isa.py): a decision
    # measured under one setting says nothing about another.
    settings = ", ".join(f"{name}={os.environ[name]}" for name in _KERNEL_SETTINGS if os.environ.get(name))
    return f"CPU {_cpu_model()} x{threads} threads" + (f" ({settings})" if settings else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(shape, channel_axis: int, dtype: str) -> str:
    dims = "x".join("?" if d is None else str(d) for d in shape)
    return f"{device()} | {dtype} | {dims} | channel axis {channel_axis % len(shape)}"


def _timed_shape(shape) -> tuple[int, ...] | None:
    """The shape to time: an unknown batch size becomes :data:`UNKNOWN_BATCH`; any other unknown size, None."""
    if any(d is None for d in shape[1:]):
        return None
    return (UNKNOWN_BATCH if shape[0] is None else shape[0], *shape[1:])


def use_fused(shape, channel_axis: int, dtype: str) -> bool:
    """Whether a ``fused=None`` training call on TensorFlow's kernel-compatible input takes the kernel."""
    chosen = mode()
    if chosen in ("always", "never"):
        return chosen == "always"
    timed = _timed_shape(shape)
    if chosen == "rule" or timed is None:
        return _fused.pays_off(shape, channel_axis)
    key = _key(shape, channel_axis, dtype)
    with _lock:
        _load_cache()
        if key not in _decisions:
            _decide(key, timed, channel_axis, dtype, repeats=5)
        return _decisions[key]


def tune(input_shape, *, axis: int = -1, dtype: str = "float32", repeats: int = 5) -> bool:
    """Time the fused and the generic training path for this input and keep the faster; return True for fused.

    ``input_shape`` is the layer's input shape (batch size may be None), ``axis`` its channel axis.
    The decision replaces any cached one, in this process and in ``KERAS_BN_FUSED_CACHE`` if set.
    """
    shape = tuple(input_shape)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for input_shape {shape}")
    if _fused.data_format(len(shape), axis % len(shape)) is None:
        raise ValueError(f"the fused kernel needs the channel axis last or at 1 (rank >= 3), got axis {axis}")
    if dtype not in _fused.DTYPES:
        raise ValueError(f"the fused kernel takes {', '.join(_fused.DTYPES)}, got dtype {dtype!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    timed = _timed_shape(shape)
    if timed is None:
        raise ValueError(f"input_shape {shape} has an unknown size beyond the batch axis; give every size")
    with _lock:
        _load_cache()
        _decide(_key(shape, axis, dtype), timed, axis % len(shape), dtype, repeats=repeats)
        return _decisions[_key(shape, axis, dtype)]


def decisions() -> dict[str, bool]:
    """The decisions made or loaded so far (key: device | dtype | shape | channel axis)."""
    with _lock:
        return dict(_decisions)


def _decide(key: str, shape: tuple[int, ...], channel_axis: int, dtype: str, repeats: int) -> None:
    fused_s, generic_s = measure(shape, channel_axis, dtype, repeats)
    _decisions[key] = fused_s < generic_s
    _save_cache()


def measure(shape: tuple[int, ...], channel_axis: int, dtype: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one fused and one generic training step (forward + backward), interleaved rounds.

    Runs in a thread of its own: TensorFlow's graph and gradient-tape state belong to a thread, so
    there the steps run eagerly even while the caller traces a ``tf.function`` (``tf.init_scope``
    would leave the graph too, but pauses the tape the steps need).
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["times"] = _time_steps(_steps(shape, channel_axis, dtype), repeats)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="keras_bn.tuning.measure")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["times"]


def _time_steps(steps, repeats: int) -> tuple[float, float]:
    for step in steps:
        step()  # trace
    times: tuple[list[float], list[float]] = ([], [])
    for round_index in range(repeats):
        for which in (round_index % 2, 1 - round_index % 2):  # alternate who goes first
            start = time.perf_counter()
            steps[which]()
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _steps(shape, channel_axis: int, dtype: str):
    """Two eager-callable training steps, fused kernel and generic path, on fixed random data."""
    x = tf.cast(tf.random.stateless_normal(shape, seed=[0, 0]), dtype)
    dy = tf.cast(tf.random.stateless_normal(shape, seed=[0, 1]), dtype)
    channels = shape[channel_axis]
    gamma, beta = tf.ones([channels]), tf.zeros([channels])
    fmt = _fused.data_format(len(shape), channel_axis)
    axes = tuple(a for a in range(len(shape)) if a != channel_axis)

    def fused_forward(x, gamma, beta):
        return _fused.train(x, gamma, beta, _EPSILON, fmt)[0]

    def generic_forward(x, gamma, beta):
        x = tf.cast(x, tf.float32)
        return _ops.normalize_batch(x, _ops.moments(x, axes), gamma, beta, _EPSILON, axes)

    def step_of(forward):
        @tf.function
        def step(x, dy, gamma, beta):
            with tf.GradientTape() as tape:
                tape.watch([x, gamma, beta])
                loss = tf.reduce_sum(tf.cast(forward(x, gamma, beta), tf.float32) * tf.cast(dy, tf.float32))
            return tape.gradient(loss, [x, gamma, beta])

        return lambda: step(x, dy, gamma, beta)[1].numpy()  # .numpy(): wait for the result

    return step_of(fused_forward), step_of(generic_forward)


def _cache_path() -> Path | None:
    path = os.environ.get(CACHE_VARIABLE)
    return Path(path) if path else None


def _load_cache() -> None:
    """Read ``KERAS_BN_FUSED_CACHE`` once per path; a file that is not ours raises instead of being overwritten."""
    path = _cache_path()
    if path is None or str(path) in _cache_loaded:
        return
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{CACHE_VARIABLE}: cannot read {path} as a JSON object of decisions: {exc}") from None
        if not isinstance(stored, dict) or not all(isinstance(v, bool) for v in stored.values()):
            raise ValueError(f"{CACHE_VARIABLE}: {path} is not a JSON object of true/false decisions")
        for key, value in stored.items():
            _decisions.setdefault(key, value)
    _cache_loaded.add(str(path))


def _save_cache() -> None:
    """Write every decision to ``KERAS_BN_FUSED_CACHE`` (whole file replaced at once: no half-written file)."""
    path = _cache_path()
    if path is None:
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_decisions, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)
