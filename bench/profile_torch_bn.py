"""Where a PyTorch BN training step spends its time: torch_ref vs torch.nn.BatchNorm*d under torch.profiler.

Load-independent where the timing tables are not: the number of ATen ops per step (each a dispatch of a few
microseconds on a CPU, whatever else runs), the number of x-sized allocations, and each op's self-CPU time
(which does depend on load). Three workloads, as bench/bench_modes.py times them:

- **lenet**: one LeNet-BN training step, batch 64 (forward, cross-entropy, backward, SGD with momentum);
- **layer**: one BN step alone on a 64x64x56x56 float32 NCHW batch (forward with the running-statistics
  update, backward from a fixed cotangent to x, weight and bias);
- **lenet-bn**: each of LeNet-BN's four BN layers alone at its batch-64 shape, one step as in ``layer``, with
  the step's time split by where it goes: ATen ops that touch x-sized data (the arithmetic passes), ATen ops on
  per-channel vectors (dispatch, almost no arithmetic), and the rest (Python, the autograd Function and engine),
  next to ``floor``: the op count times this machine's cost of one trivial ATen op on a per-channel vector.
  torch_ref runs twice: as it trains (its step replayed by TorchScript, torch_ref._replay) and op by op (replays
  off), which shows what the replay saves.

    python bench/profile_torch_bn.py                       # every workload, top 12 ops each
    python bench/profile_torch_bn.py --workloads lenet --top 30 --steps 20
    python bench/profile_torch_bn.py --workloads lenet-bn  # where torch_ref's extra time per BN layer goes
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
from _steps import torch_batch_norm_class, torch_batch_norm_step, torch_training_step  # bench/_steps.py
from torch.profiler import ProfilerActivity, profile

import torch_ref
from export.machine import describe_machine
from torch_ref.model import lenet_bn

WORKLOADS = ("lenet", "layer", "lenet-bn")
#: LeNet-BN's BN inputs at batch 64, channels at dim 1 (bench_modes.lenet_bn_shapes, channels last)
LENET_BN_SHAPES = ((64, 6, 24, 24), (64, 16, 8, 8), (64, 120), (64, 84))


def lenet_step(batch_norm: str, batch: int = 64):
    """One LeNet-BN training step with ``batch_norm`` ("ours" or "torch"), on fixed random images."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((batch, 1, 28, 28), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, batch))
    return torch_training_step(lenet_bn(batch_norm, seed=0), images, labels)


def _profiled(step, steps: int, **options) -> profile:
    """torch.profiler's record of ``steps`` calls of ``step`` after 3 unrecorded ones (allocator, lazy initialization);
    ``options`` go to ``torch.profiler.profile``."""
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], **options) as prof:
        for _ in range(steps):
            step()
    return prof


def profile_step(step, steps: int, numel: int) -> dict:
    """ATen ops per step, x-sized allocations per step (outputs of ``numel`` elements) and per-op self-CPU (ms)."""
    prof = _profiled(step, steps, profile_memory=True)
    per_op = {}
    for event in prof.key_averages():
        per_op[event.key] = (event.count / steps, event.self_cpu_time_total / steps / 1e3)
    aten = sum(count for name, (count, _) in per_op.items() if name.startswith("aten::"))
    # an allocation is charged to the op that made it (self memory): x-sized float32 buffers, y and dx included
    allocations = sum(1 for event in prof.events() if event.self_cpu_memory_usage >= 4 * numel)
    total = sum(ms for _, ms in per_op.values())
    return {"aten_ops": aten, "x_sized_allocations": allocations / steps, "self_cpu_ms": total, "per_op": per_op}


def median_step_us(step, calls: int = 50, rounds: int = 15) -> float:
    """Median over ``rounds`` of the mean wall time of ``calls`` un-profiled steps, in microseconds."""
    for _ in range(calls):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def trivial_op_us() -> float:
    """This machine's cost of one ATen op on a per-channel vector from Python (``a * b``, 16 floats): the floor
    every per-channel op pays, whatever its arithmetic."""
    a, b = torch.rand(1, 16, 1, 1), torch.rand(1, 16, 1, 1)
    return median_step_us(lambda: a * b, calls=2000)


def split_step(step, numel: int, steps: int = 20, reference=None) -> dict:
    """ATen ops per step split into x-sized (an input of ``numel`` elements: an arithmetic pass) and per-channel,
    with their self-CPU time per step (us, under the profiler).

    ``reference``: a step issuing the same ATen ops one at a time from Python, whose recorded input shapes decide
    each op's kind. Why: ops run by TorchScript's interpreter (torch_ref's replays) are recorded with stale extra
    input shapes (torch 2.13: ``aten::mul`` of two (1, C) vectors listed with a third, x-sized, shape), so their
    own records would count per-channel ops as passes. Raises if the two op sequences differ."""
    events = labelled = _top_level_aten(_profiled(step, steps, record_shapes=True))
    if reference is not None:
        labelled = _top_level_aten(_profiled(reference, steps, record_shapes=True))
        if [e.name for e in labelled] != [e.name for e in events]:
            raise RuntimeError("the reference step issues other ATen ops than the step: no kinds to borrow")
    kinds = [_kind(event, numel) for event in labelled]
    split = {"x_sized": [0, 0.0], "per_channel": [0, 0.0]}
    for event, kind in zip(events, kinds, strict=True):
        split[kind][0] += 1
        split[kind][1] += event.cpu_time_total  # the op with its sub-calls (views, copies, allocation)
    return {kind: (count / steps, us / steps) for kind, (count, us) in split.items()}


def _top_level_aten(prof: profile) -> list:
    """Top-level ATen calls only: an op's own sub-calls are inside its self and child time."""
    return [
        event
        for event in prof.events()
        if event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    ]


def _kind(event, numel: int) -> str:
    shapes = [shape for shape in event.input_shapes if isinstance(shape, list)]
    sizes = [math.prod(shape) for shape in shapes if shape and all(isinstance(d, int) for d in shape)]
    return "x_sized" if numel in sizes else "per_channel"


def op_by_op(step):
    """``step`` with torch_ref's replays off (torch_ref._replay): spec's formulas issued one ATen op at a time from
    Python, the same ops in the same order (tests/test_torch_replay.py)."""

    def run() -> None:
        with torch_ref._replay.op_by_op():
            step()

    return run


def print_breakdown(threads: int) -> None:
    """The lenet-bn workload: per BN layer, torch.nn and torch_ref, where a training step's time goes."""
    floor = trivial_op_us()
    print(f"\nlenet-bn: one BN layer's training step, float32, {threads} thread(s); trivial ATen op {floor:.2f} us")
    print(
        f"  {'shape':14s} {'variant':10s} {'us/step':>8s} {'x-sized ops':>12s} {'us':>7s} {'per-channel ops':>16s}"
        f" {'us':>7s} {'floor us':>9s} {'rest us':>8s}"
    )
    totals = {}
    for shape in LENET_BN_SHAPES:
        numel = math.prod(shape)
        replayed = torch_batch_norm_step(torch_batch_norm_class(torch_ref, shape), shape)
        for name, step, reference in (
            ("torch.nn", torch_batch_norm_step(torch_batch_norm_class(torch.nn, shape), shape), None),
            ("torch_ref", replayed, op_by_op(replayed)),
            ("op by op", op_by_op(torch_batch_norm_step(torch_batch_norm_class(torch_ref, shape), shape)), None),
        ):
            wall = median_step_us(step)
            split = split_step(step, numel, reference=reference)
            (x_ops, x_us), (c_ops, c_us) = split["x_sized"], split["per_channel"]
            # the rest: Python, the autograd Function and engine (profiled op times include the profiler's own cost,
            # so this is a lower bound)
            rest = max(wall - x_us - c_us, 0.0)
            totals[name] = totals.get(name, 0.0) + wall
            print(
                f"  {'x'.join(map(str, shape)):14s} {name:10s} {wall:8.1f} {x_ops:12.0f} {x_us:7.1f} {c_ops:16.0f}"
                f" {c_us:7.1f} {(x_ops + c_ops) * floor:9.1f} {rest:8.1f}"
            )
    ratio = totals["torch_ref"] / totals["torch.nn"]
    print(
        f"  four layers: torch.nn {totals['torch.nn']:.0f} us, torch_ref {totals['torch_ref']:.0f} us ({ratio:.2f}x); "
        f"torch_ref op by op (its replays off) {totals['op by op']:.0f} us"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (lenet; the layer runs 2)")
    parser.add_argument("--top", type=int, default=12, help="ops listed per variant, by self-CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(WORKLOADS) or args.steps < 1 or args.top < 0 or args.threads < 1:
        parser.error(f"--workloads takes a comma list of {', '.join(WORKLOADS)}; --steps, --threads positive")
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}; torch {torch.__version__}, {args.threads} intra-op thread(s)")
    for workload in workloads:
        if workload == "lenet-bn":
            print_breakdown(args.threads)
            continue
        if workload == "lenet":
            variants = {"torch.nn": lenet_step("torch"), "torch_ref": lenet_step("ours")}
            steps, numel = args.steps, 64 * 6 * 24 * 24  # conv1's BN input, the largest LeNet activation
        else:
            variants = {
                "torch.nn": torch_batch_norm_step(torch.nn.BatchNorm2d),
                "torch_ref": torch_batch_norm_step(torch_ref.BatchNorm2d),
            }
            steps, numel = 2, 64 * 64 * 56 * 56
        print(f"\n{workload}: per step, mean of {steps} profiled steps")
        for name, step in variants.items():
            result = profile_step(step, steps, numel)
            ops, allocations = result["aten_ops"], result["x_sized_allocations"]
            print(
                f"  {name:10s} ATen ops {ops:6.0f}   x-sized allocations {allocations:4.1f}"
                f"   self-CPU {result['self_cpu_ms']:8.2f} ms (load-dependent)"
            )
            ranked = sorted(result["per_op"].items(), key=lambda item: -item[1][1])[: args.top]
            for op, (count, ms) in ranked:
                print(f"      {op[:52]:52s} {count:6.1f} x {ms:9.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
