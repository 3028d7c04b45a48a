"""Does ``_fused.pays_off`` pick the faster path? The fused kernel vs the generic path per shape, on two ISAs.

For each input shape, one BN training step (forward with ``training=True``, moving statistics updated, backward
to x, gamma and beta; ``bench/_steps.py``, in ``tf.function`` as ``fit`` runs it without XLA) of
``keras_bn.BatchNorm(fused=True)`` (TensorFlow's ``FusedBatchNormV3``, which oneDNN implements on x86) and of
``BatchNorm(fused=False)`` (the generic ``keras.ops`` path), in interleaved rounds. Each timed sample runs the
step enough times to take ``--target-ms`` (small shapes take well under a millisecond). The measured winner is
decided by the 95% interval of the median per-round ratio fused / generic (``bench/_timing.py``): "fused" if it
lies below 1, "generic" above 1, "tie" (within noise: either path is as fast) if it spans 1. The rule's prediction,
``pays_off(shape, -1)``, is compared with each decided winner.

Each ISA runs in a child process of its own (``--isas``): ``native``, and ``avx2``, this CPU capped to AVX2 by the
variables ``bench/_isa.py`` lists (what that does and does not emulate is said there). A second child per ISA
runs every shape once, untimed, with ``ONEDNN_VERBOSE=1`` and records which oneDNN implementation served the
fused kernel (e.g. ``bnorm_tbb_jit:avx512_core``, or ``nspc_bnorm:any``, its reference loop).

    nice -n 10 python bench/bench_fused_rule.py --json docs/results/fused-rule.json    # the README's table
    python bench/bench_fused_rule.py --shapes 8x4x4x6,8x16 --repeats 3 --target-ms 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _isa import ISAS, describe_isa, isa_environment, isa_record  # bench/_isa.py
from _steps import tf_batch_norm_step  # bench/_steps.py
from _timing import interleaved_rounds, ratio_interval, spread  # bench/_timing.py

from export.machine import describe_machine, machine_info

#: The shapes the rule must get right (NHWC or (batch, features)), each with why it is here.
SHAPES = {
    "64x24x24x6": "LeNet-BN conv 1",
    "64x8x8x16": "LeNet-BN conv 2",
    **{f"64x8x8x{c}": f"conv 2's extent, {c} channels" for c in (4, 32, 64)},
    **{f"64x{e}x{e}x16": f"conv 2's channels, {e}x{e}" for e in (4, 12)},
    **{f"{n}x8x8x16": f"conv 2, batch {n}" for n in (32, 128)},
    "16x14x14x16": "batch 16",
    "64x120": "LeNet-BN dense 1",
    "64x84": "LeNet-BN dense 2",
    "64x56x56x64": "bench_modes' layer step",
    **{f"64x14x14x{c}": f"{c} channels" for c in (3, 4, 6, 7, 8, 12, 16, 24, 32, 48, 64)},
    "256x120": "LeNet-BN dense 1, batch 256",
    "256x512": "2-D, wide",
    "1024x64": "2-D, tall",
}
MIN_REPEATS = 7
_JSON_MARK = "BENCH_FUSED_RULE_JSON "
_ONEDNN_EXEC = re.compile(r"onednn_verbose,[^,]*,primitive,exec,cpu,batch_normalization,([^,]+),forward_training")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help=f"timed rounds per shape (>= {MIN_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (tracing)")
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads")
    parser.add_argument("--target-ms", type=float, default=20.0, help="time of one sample: repeat a short step")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of shapes like 64x24x24x6 or 64x120")
    parser.add_argument("--isas", default=",".join(ISAS), help=f"comma list of {', '.join(ISAS)}")
    parser.add_argument("--json", help="write every timing and the comparison to this file")
    parser.add_argument("--child", choices=("time", "probe"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if min(args.repeats, args.threads) < 1 or args.warmup < 0 or args.target_ms <= 0:
        parser.error("--repeats, --threads and --target-ms must be positive, --warmup not negative")
    try:
        args.shape_list = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        args.shape_list = []
    if not args.shape_list or any(len(s) not in (2, 4) or min(s) < 1 for s in args.shape_list):
        parser.error(f"--shapes takes NxHxWxC or NxC shapes of positive integers; got {args.shapes!r}")
    args.isa_list = [isa for isa in args.isas.split(",") if isa]
    if not args.isa_list or set(args.isa_list) - set(ISAS):
        parser.error(f"--isas takes a comma list of {', '.join(ISAS)}; got {args.isas!r}")
    return args


def _label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------- children


def _steps(args, shape):
    """The fused and the generic training step of ``keras_bn.BatchNorm`` on seeded data of ``shape``."""
    import numpy as np
    import tensorflow as tf

    import keras_bn

    rng = np.random.default_rng(0)
    x = tf.constant((0.5 + rng.standard_normal(shape)).astype(np.float32))
    dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
    return {
        "fused": tf_batch_norm_step(keras_bn.BatchNorm(fused=True), x, dy, jit=False),
        "generic": tf_batch_norm_step(keras_bn.BatchNorm(fused=False), x, dy, jit=False),
    }


def _repeated(step, calls: int):
    def run():
        for _ in range(calls):
            step()

    return run


def child_main(args) -> int:
    """``time``: every shape's interleaved timings; ``probe``: each shape once, untimed (oneDNN verbose on)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # before any op: pools fixed at first use
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.get_logger().setLevel("ERROR")  # one tf.function per step and shape is intended, not retracing
    from keras_bn import _fused

    shapes = {}
    for shape in args.shape_list:
        steps = _steps(args, shape)
        if args.child == "probe":
            print(f"SHAPE {_label(shape)}", flush=True)
            steps["fused"]()
            continue
        for step in steps.values():
            step()  # trace
        once = min(min(_time_once(step) for _ in range(3)) for step in steps.values())
        calls = max(1, min(1000, math.ceil(args.target_ms / 1e3 / once)))
        seconds = interleaved_rounds({k: _repeated(v, calls) for k, v in steps.items()}, args.repeats, args.warmup)
        shapes[_label(shape)] = {
            "rule_says_fused": _fused.pays_off(shape, -1),
            "calls_per_sample": calls,
            "seconds_per_call": {k: [s / calls for s in v] for k, v in seconds.items()},
        }
    if args.child == "time":
        threads = f"intra_op={tf.config.threading.get_intra_op_parallelism_threads()} inter_op=1"
        print(_JSON_MARK + json.dumps({"shapes": shapes, "threads": threads, "tensorflow": tf.__version__}))
    return 0


def _time_once(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ parent


def _run_child(kind: str, isa: str, argv: list[str]) -> str:
    env = isa_environment(isa) | {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if kind == "probe":
        env["ONEDNN_VERBOSE"] = "1"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", kind]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_fused_rule: the {kind} child for --isa {isa} failed (exit {done.returncode})")
    return done.stdout


def onednn_kernels(verbose_output: str) -> dict[str, str]:
    """Shape -> the oneDNN implementation of its first forward-training BN call, from a probe child's stdout."""
    kernels, shape = {}, None
    for line in verbose_output.splitlines():
        if line.startswith("SHAPE "):
            shape = line.split()[1]
        elif shape and shape not in kernels and (match := _ONEDNN_EXEC.match(line)):
            kernels[shape] = match.group(1)
    return kernels


def winner(low: float, high: float) -> str:
    """From the interval of fused / generic time: "fused" (below 1), "generic" (above 1) or "tie"."""
    return "fused" if high < 1.0 else ("generic" if low > 1.0 else "tie")


def compare(shapes: dict) -> dict:
    """Per shape: medians, the ratio fused / generic with its interval, the winner and the rule's agreement."""
    rows = {}
    for label, timed in shapes.items():
        fused, generic = timed["seconds_per_call"]["fused"], timed["seconds_per_call"]["generic"]
        ratios = [a / b for a, b in zip(fused, generic, strict=True)]
        low, high, coverage = ratio_interval(fused, generic, paired=True)
        won = winner(low, high)
        predicted = "fused" if timed["rule_says_fused"] else "generic"
        rows[label] = {
            "fused_ms": 1e3 * statistics.median(fused),
            "generic_ms": 1e3 * statistics.median(generic),
            "ratio": statistics.median(ratios),
            "ratio_iqr": spread(ratios)["iqr"],
            "interval": [low, high],
            "interval_coverage": coverage,
            "winner": won,
            "rule": predicted,
            "rule_agrees": None if won == "tie" else won == predicted,
        }
    decided = [r for r in rows.values() if r["rule_agrees"] is not None]
    summary = {
        "shapes": len(rows),
        "decided": len(decided),
        "agree": sum(r["rule_agrees"] for r in decided),
        "ties": len(rows) - len(decided),
    }
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    child_argv = list(sys.argv[1:] if argv is None else argv)
    load_at_start = os.getloadavg()[0]
    runs = {}
    for isa in args.isa_list:
        started = time.perf_counter()
        kernels = onednn_kernels(_run_child("probe", isa, child_argv))
        timed = json.loads(_run_child("time", isa, child_argv).split(_JSON_MARK, 1)[1])
        result = compare(timed["shapes"])
        for label, row in result["rows"].items():
            row["onednn_kernel"] = kernels.get(label, "unknown")
        record = isa_record(isa, machine)
        runs[isa] = {"isa": record, "as_run": describe_isa(record, describe_machine(machine))} | result
        runs[isa] |= {"threads": timed["threads"], "tensorflow": timed["tensorflow"], "shapes": timed["shapes"]}
        print(f"[{isa}] {time.perf_counter() - started:.0f} s", flush=True)
    report = {
        "machine": machine,
        "command": "python bench/bench_fused_rule.py " + " ".join(child_argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": args.threads}
        | {"target_ms": args.target_ms, "smoke": args.repeats < MIN_REPEATS},
        "versions": {"python": platform.python_version()},
        "purpose": {label: SHAPES.get(label, "") for label in map(_label, args.shape_list)},
        "runs": runs,
    }
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_report(report: dict) -> None:
    load = report["load_average"]
    print(f"1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end")
    if report["settings"]["smoke"]:
        print(f"SMOKE RUN: fewer than {MIN_REPEATS} rounds, not a result")
    for isa, run in report["runs"].items():
        print(f"\n[{isa}] {run['as_run']}; TF {run['threads']}")
        print(
            f"{'shape':14s} {'fused ms':>9s} {'generic ms':>10s} {'fused/gen':>9s} {'95% interval':>15s} "
            f"{'winner':>8s} {'rule':>8s}  oneDNN kernel"
        )
        for label, r in run["rows"].items():
            interval = f"{r['interval'][0]:.2f}..{r['interval'][1]:.2f}"
            print(
                f"{label:14s} {r['fused_ms']:9.3f} {r['generic_ms']:10.3f} {r['ratio']:9.2f} {interval:>15s} "
                f"{r['winner']:>8s} {r['rule']:>8s}  {r['onednn_kernel']}"
            )
        s = run["summary"]
        print(f"rule agrees on {s['agree']} of {s['decided']} decided shapes ({s['ties']} ties), ISA {isa}")


if __name__ == "__main__":
    sys.exit(main())
