"""torch_ref's training step at a git revision against the working tree's, paired in one process (issue #14).

A change to torch_ref's glue moves a LeNet training step by a few percent, less than the step's time moves from
one process to the next on a shared machine (this VM's vCPUs change speed by 2x within seconds). So both versions
run in one process, one step each per round in rotating order (``bench/_timing.interleaved_rounds``), and the
figure is the median of the per-round time ratios, working tree / REV, with its 95% distribution-free interval
(``_timing.ratio_interval``). An A/A run (``--rev HEAD`` on an unchanged tree) measures the method's own bias:
0.997 (0.987..1.005) over 2000 LeNet pairs on the Intel Xeon of docs/results (``--rev HEAD``).

Scope: ``torch_ref/batch_norm.py`` at REV is loaded beside the working tree's under another module name; spec and
torch_ref's other modules are the working tree's for both (to compare whole trees, run bench_modes in a
``git worktree``). Each version trains its own LeNet-BN (same seed, same batch) or steps its own BN layer, with
its own recorder of replays; before timing, both run three steps from the same state and the printout says
whether their outputs are equal bit for bit. Single steps, not bench_modes' 10-step calls: a step of one version
follows a step of the other, so both start from the same cache state (bench_modes' LeNet figure is the one to
compare with torch.nn, whose consecutive steps keep more in cache).

    python bench/ab_torch_ref.py --rev HEAD~1 --pairs 2000              # LeNet-BN, batch 64, 2 threads
    python bench/ab_torch_ref.py --rev HEAD~1 --workload 64x6x24x24     # one BN layer's step
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from _steps import torch_batch_norm_class, torch_batch_norm_step, torch_training_step  # bench/_steps.py
from _timing import interleaved_rounds, paired_ratio, ratio_interval, spread  # bench/_timing.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.machine import describe_machine  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision of torch_ref/batch_norm.py to compare against")
    parser.add_argument("--pairs", type=int, default=2000, help="timed rounds: one step of each version per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (recording the replays)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workload", default="lenet", help="lenet, or a BN layer's input shape NxC[xHxW]")
    parser.add_argument("--batch", type=int, default=64, help="LeNet-BN batch size")
    args = parser.parse_args(argv)
    if args.workload != "lenet":
        try:
            args.shape = tuple(int(d) for d in args.workload.split("x"))
        except ValueError:
            parser.error(f"--workload must be lenet or a shape like 64x6x24x24, got {args.workload!r}")
        if len(args.shape) not in (2, 3, 4, 5) or min(args.shape) < 1:
            parser.error(f"--workload shape must have 2 to 5 positive dims, got {args.workload!r}")
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    return args


def module_at(rev: str) -> ModuleType:
    """``torch_ref/batch_norm.py`` as of ``rev``, imported beside the working tree's (SystemExit naming the problem)."""
    shown = subprocess.run(
        ["git", "show", f"{rev}:torch_ref/batch_norm.py"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        raise SystemExit(f"ab_torch_ref: git has no torch_ref/batch_norm.py at {rev!r}: {shown.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as source:
        source.write(shown.stdout)
    name = "torch_ref._batch_norm_at_rev"
    spec = importlib.util.spec_from_file_location(name, source.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any import-time failure: the two versions do not fit together
        raise SystemExit(
            f"ab_torch_ref: torch_ref/batch_norm.py at {rev!r} does not load beside the working tree's spec and "
            f"torch_ref modules ({type(error).__name__}: {error}); compare whole trees with bench_modes in a git "
            "worktree instead"
        ) from error
    return module


@contextlib.contextmanager
def _lenet_built_with(batch_norm: ModuleType) -> Iterator[None]:
    """torch_ref.lenet_bn("ours") builds its BN layers from ``batch_norm``'s classes inside."""
    from torch_ref import model

    saved = model._BATCH_NORMS["ours"]
    model._BATCH_NORMS["ours"] = (batch_norm.BatchNorm1d, batch_norm.BatchNorm2d)
    try:
        yield
    finally:
        model._BATCH_NORMS["ours"] = saved


def training_step(batch_norm: ModuleType, args: argparse.Namespace) -> Callable[[], object]:
    """One training step of ``batch_norm``'s layers on fixed data: LeNet-BN with SGD (bench_modes' PyTorch loop),
    or a BN layer alone (profile_torch_bn's layer step); it returns the loss, or the layer's gradients."""
    import torch

    from torch_ref.model import lenet_bn

    data = torch.Generator().manual_seed(0)
    if args.workload == "lenet":
        with _lenet_built_with(batch_norm):
            model = lenet_bn("ours", seed=0)
        images = torch.randn(args.batch, 1, 28, 28, generator=data)
        labels = torch.randint(0, 10, (args.batch,), generator=data)
        return torch_training_step(model, images, labels)
    return torch_batch_norm_step(torch_batch_norm_class(batch_norm, args.shape), args.shape)


def compare(args: argparse.Namespace) -> dict:
    """Seconds per step of each version over ``--pairs`` rounds, their paired ratio and whether outputs agree."""
    import torch

    import torch_ref.batch_norm

    torch.set_num_threads(args.threads)
    if torch.get_num_interop_threads() != 1:
        with contextlib.suppress(RuntimeError):  # settable once per process, before any inter-op work (a caller's)
            torch.set_num_interop_threads(1)
    steps = {"rev": training_step(module_at(args.rev), args), "tree": training_step(torch_ref.batch_norm, args)}
    same = all(_equal(steps["rev"](), steps["tree"]()) for _ in range(3))
    seconds = interleaved_rounds(steps, args.pairs, args.warmup)
    low, high, coverage = ratio_interval(seconds["tree"], seconds["rev"], paired=True)
    return {
        "seconds": seconds,
        "same_outputs": same,
        "ratio": paired_ratio(seconds["tree"], seconds["rev"]),
        "interval": (low, high),
        "coverage": coverage,
    }


def _equal(a, b) -> bool:
    """Whether two steps' results (a loss, or a tuple of gradients) are equal bit for bit."""
    import torch

    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return all(torch.equal(p, q) for p, q in pairs)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"machine: {describe_machine()}; torch threads {args.threads}", flush=True)
    result = compare(args)
    what = f"LeNet-BN batch {args.batch}" if args.workload == "lenet" else f"a BN layer on {args.workload}"
    print(f"{what}, {args.pairs} rounds of one training step per version; outputs equal: {result['same_outputs']}")
    for name, label in (("rev", args.rev), ("tree", "working tree")):
        stats = spread(result["seconds"][name])
        print(f"  {label:>12s}: median {1e3 * stats['median']:.3f} ms/step (IQR {1e3 * stats['iqr']:.3f})")
    low, high = result["interval"]
    print(
        f"working tree / {args.rev}: {result['ratio']:.4f} ({low:.4f}..{high:.4f}, "
        f"{result['coverage']:.0%} distribution-free interval of the median per-round ratio)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
