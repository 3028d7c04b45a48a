"""Where Keras' torch backend spends LeNet-BN's time: keras_bn.BatchNorm against Keras' own layer (issue #14).

Load-independent counts first, then CPU time:

- **Python calls**: function calls the interpreter makes (``sys.setprofile``'s call and c_call events). At
  LeNet's sizes a BN call on the torch backend is mostly interpreter work, so this is the figure that moves.
- **ATen ops**: operator calls (``torch.profiler``), each a dispatch of a few microseconds whatever its size.
- **CPU time**: this thread's (``time.thread_time``: waiting for a shared core is not counted), the median over
  interleaved rounds; still load-dependent (caches, a busy sibling core), so compare within one run only.

Two workloads, as bench/bench_modes.py times them (``--workloads``):

- **lenet**: one ``train_on_batch`` step of ``keras_bn.lenet_bn(variant, seed=0)`` compiled by
  ``keras_bn.compile_lenet`` (SGD lr 0.01, momentum 0.9, ``jit_compile=False``), batch 64; also each BN layer's
  ``call()`` inside the step (Keras' ``Layer.__call__`` around it is the same code for both layers) and the
  functions whose call counts differ most between the two variants (``--top``);
- **lenet-bn**: LeNet-BN's four BN layers alone at their shapes, forward with ``training=True`` and
  ``torch.autograd.grad`` from a fixed cotangent to x, gamma and beta.

    python bench/profile_keras_torch.py                         # both workloads, 1 thread
    python bench/profile_keras_torch.py --workloads lenet --rounds 60 --top 20
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported: the backend is fixed then

import keras  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import keras_bn  # noqa: E402
from export.machine import describe_machine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modes import _inputs, _keras_lenet  # noqa: E402  (bench/bench_modes.py)

VARIANTS = ("keras", "ours")
WORKLOADS = ("lenet", "lenet-bn")
_BN_CLASSES = {"keras": keras.layers.BatchNormalization, "ours": keras_bn.BatchNorm}


class CallProbe:
    """Wraps each variant's BN ``call`` to count and time it per layer, one measurement kind at a time.

    Installed after the layers are built (``functools.wraps`` keeps the signature Keras reads from ``call``).
    """

    def __init__(self) -> None:
        self.kind: str | None = None  # None, "python" or "cpu"
        self.python: dict[str, Counter] = {}
        self.cpu: dict[str, list[float]] = {}
        for variant, cls in _BN_CLASSES.items():
            cls.call = self._wrap(cls.call, variant)

    def _wrap(self, call, variant: str):
        @functools.wraps(call)
        def probed(layer, *args, **kwargs):
            key = f"{variant}|{layer.name}"
            if self.kind == "python":
                counts = self.python.setdefault(key, Counter())
                sys.setprofile(_counter(counts))
                try:
                    return call(layer, *args, **kwargs)
                finally:
                    sys.setprofile(None)
            if self.kind == "cpu":
                start = time.thread_time()
                out = call(layer, *args, **kwargs)
                self.cpu.setdefault(key, []).append(time.thread_time() - start)
                return out
            with record_function(f"bn|{key}"):  # an ATen-op count is a profiler's range per call
                return call(layer, *args, **kwargs)

        return probed


def _counter(counts: Counter):
    """A ``sys.setprofile`` hook counting calls by ``file:function`` (C functions by qualified name)."""

    def hook(frame, event, arg):
        if event == "call":
            counts[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            name = getattr(arg, "__qualname__", repr(arg))
            counts[f"C:{arg.__name__ if name.startswith('pybind11') else name}"] += 1  # pybind11's qualname is its type

    return hook


def python_calls(step, steps: int) -> Counter:
    counts: Counter = Counter()
    sys.setprofile(_counter(counts))
    try:
        for _ in range(steps):
            step()
    finally:
        sys.setprofile(None)
    return Counter({name: n / steps for name, n in counts.items()})


def aten_ops(step, steps: int) -> tuple[float, dict[str, float]]:
    """ATen ops per step, and per probed BN call (``bn|variant|layer`` ranges)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.events()
    total = sum(1 for e in events if e.name.startswith("aten::")) / steps
    per_call: dict[str, list[int]] = {}
    for event in events:
        if event.name.startswith("bn|"):
            per_call.setdefault(event.name[3:], []).append(_aten_below(event))
    return total, {key: statistics.mean(counts) for key, counts in per_call.items()}


def _aten_below(event) -> int:
    return sum((child.name.startswith("aten::")) + _aten_below(child) for child in event.cpu_children)


def cpu_rounds(steps: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Thread CPU seconds per step of each variant, in interleaved rounds (rotating order)."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.thread_time()
            for _ in range(per_round):
                steps[name]()
            seconds[name].append((time.thread_time() - start) / per_round)
    return seconds


def lenet_steps(batch: int) -> dict:
    _, _, images, labels, _ = _inputs((1, 1, 1, 1), batch)
    models = {variant: _keras_lenet(variant, False) for variant in VARIANTS}
    return {variant: (lambda m=model: m.train_on_batch(images, labels)) for variant, model in models.items()}


def lenet_bn_steps(batch: int) -> dict:
    _, _, _, _, small = _inputs((1, 1, 1, 1), batch)
    steps = {}
    for variant, cls in _BN_CLASSES.items():
        layers = [cls(name=f"bn{index}") for index in range(1, len(small) + 1)]  # LeNet-BN's names
        xs = [torch.from_numpy(x.copy()).requires_grad_(True) for x, _ in small]
        dys = [torch.from_numpy(dy.copy()) for _, dy in small]
        for layer, x in zip(layers, xs, strict=True):
            layer.build(tuple(x.shape))
        inputs = [t for layer, x in zip(layers, xs, strict=True) for t in (x, layer.gamma.value, layer.beta.value)]

        def step(layers=layers, xs=xs, dys=dys, inputs=inputs):
            ys = [layer(x, training=True) for layer, x in zip(layers, xs, strict=True)]
            return torch.autograd.grad(ys, inputs, grad_outputs=dys)

        steps[variant] = step
    return steps


def report(workload: str, steps: dict, probe: CallProbe, args) -> None:
    for step in steps.values():  # warm-up: allocator, lazy initialization, Keras' first-call tracing
        for _ in range(3):
            step()
    probe.python.clear()
    probe.cpu.clear()
    python = {variant: python_calls(step, args.steps) for variant, step in steps.items()}
    aten = {variant: aten_ops(step, args.steps) for variant, step in steps.items()}
    probe.kind = "python"
    for step in steps.values():
        for _ in range(args.steps):
            step()
    probe.kind = "cpu"
    cpu = cpu_rounds(steps, args.rounds, args.per_round)
    probe.kind = None
    ratios = sorted(a / b for a, b in zip(cpu["ours"], cpu["keras"], strict=True))

    what = "train_on_batch step" if workload == "lenet" else "call of the 4 BN layers, forward and backward"
    print(f"\n{workload}: per {what} (batch {args.batch})")
    print(f"  {'':44s} {'keras':>10s} {'ours':>10s} {'ours-keras':>11s}")
    rows = [
        ("Python calls", {v: sum(python[v].values()) for v in VARIANTS}, "{:10.0f}"),
        ("ATen ops", {v: aten[v][0] for v in VARIANTS}, "{:10.0f}"),
        (
            f"CPU ms (median of {args.rounds} rounds; load-dependent)",
            {v: 1e3 * statistics.median(cpu[v]) for v in VARIANTS},
            "{:10.3f}",
        ),
    ]
    for label, values, fmt in rows:
        diff = values["ours"] - values["keras"]
        print(f"  {label:44s} {fmt.format(values['keras'])} {fmt.format(values['ours'])} {fmt.format(diff)[-11:]:>11s}")
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    low, median, high = quartiles
    print(f"  CPU time ours / keras, per round: median {median:.3f}, quartiles {low:.3f}..{high:.3f}")

    calls = python["keras"].keys() | python["ours"].keys()
    if args.top and workload == "lenet":
        print(f"  functions called most differently per step (ours - keras), top {args.top}:")
        ranked = sorted(calls, key=lambda name: -abs(python["ours"][name] - python["keras"][name]))
        for name in ranked[: args.top]:
            keras_n, ours_n = python["keras"][name], python["ours"][name]
            print(f"    {name[:64]:64s} {keras_n:7.1f} {ours_n:7.1f} {ours_n - keras_n:+7.1f}")

    layers = sorted({key.split("|")[1] for key in probe.python})
    print("  per BN layer call(), inside the step:  Python calls / ATen ops / CPU us, keras -> ours")
    for layer in layers:
        keys = {v: f"{v}|{layer}" for v in VARIANTS}
        python_n = {v: sum(probe.python[keys[v]].values()) / args.steps for v in VARIANTS}
        aten_n = {v: aten[v][1].get(keys[v], float("nan")) for v in VARIANTS}
        cpu_us = {v: 1e6 * statistics.median(probe.cpu[keys[v]]) for v in VARIANTS}
        parts = [
            f"{label} {n['keras']:7.1f} -> {n['ours']:7.1f}"
            for label, n in (("Python calls", python_n), ("ATen ops", aten_n), ("CPU us", cpu_us))
        ]
        print(f"    {layer:22s} " + "   ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--batch", type=int, default=64, help="LeNet-BN batch size")
    parser.add_argument("--steps", type=int, default=5, help="steps counted (Python calls, ATen ops)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds timed (CPU time)")
    parser.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--top", type=int, default=12, help="functions listed by call-count difference (lenet)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads takes a comma list of {', '.join(WORKLOADS)}; got {args.workloads!r}")
    if min(args.batch, args.steps, args.rounds, args.per_round, args.threads) < 1 or args.top < 0:
        parser.error("--batch, --steps, --rounds, --per-round and --threads must be positive, --top >= 0")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print(f"machine: {describe_machine()}")
    print(f"torch {torch.__version__}, keras {keras.__version__} (torch backend), {args.threads} intra-op thread(s)")
    print(f"1-minute load average at start: {os.getloadavg()[0]:.1f}")
    build = {"lenet": lenet_steps, "lenet-bn": lenet_bn_steps}
    steps = {workload: build[workload](args.batch) for workload in workloads}
    probe = CallProbe()  # after every layer is built
    for workload in workloads:
        report(workload, steps[workload], probe, args)
    print(f"\n1-minute load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
