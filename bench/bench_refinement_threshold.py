"""Is ``keras_bn.layer.CONDITIONAL_REFINEMENT_VALUES`` where the conditional refinement starts to pay? (issue #14)

From that many values on, ``keras_bn.BatchNorm`` refines the batch mean only where needed (SPEC.md §8.5, a traced
``tf.cond`` / ``lax.cond``); below it, always. The threshold was first set from XLA kernel counts; here it is
timed. For each shape, one BN training step (fwd with ``training=True``, moving statistics updated, bwd from a fixed
cotangent; ``bench/_steps.py`` on TensorFlow, ``jax.vjp`` under ``jax.jit`` on JAX) of ``BatchNorm(fused=False)``
(the generic path, the only one that refines; the fused kernel has no such step) is traced twice: with the
conditional forced on and forced off (the module constant patched before tracing; the math is the same, SPEC.md
§8.5), and both run in interleaved rounds (``bench/_timing.py``), ``--steps`` steps per timed call. The ratio
conditional / unconditional is the median of per-round ratios with its 95% interval; the measured winner is
"conditional" if the whole interval is below 1, "unconditional" if above, else "tie". The rule (values >= the
threshold) is compared with each decided winner. One child process per backend (``KERAS_BACKEND`` is fixed at
import): modes tf.function and tf xla (TensorFlow), jax jit (JAX).

    nice -n 10 python bench/bench_refinement_threshold.py
    python bench/bench_refinement_threshold.py --shapes 4x8,4x4x4x4 --repeats 2 --steps 1 --warmup 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _timing import interleaved_rounds, paired_ratio, ratio_interval  # bench/_timing.py

from export.machine import describe_machine, machine_info

#: LeNet-BN's four BN inputs at batch 64 (bench_modes.lenet_bn_shapes) and shapes bracketing the threshold
DEFAULT_SHAPES = "64x24x24x6,64x8x8x16,32x8x8x16,64x12x12x16,64x120,64x84"
BACKENDS = ("tensorflow", "jax")
_JSON_MARK = "REFINEMENT_JSON "


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of channels-last shapes, e.g. 64x120")
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds (>= 7 for a result)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (tracing, compiling)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call (one step is well under 1 ms)")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--json", help="write the machine, settings and rows to this file")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)  # internal: one backend
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps, args.threads) < 1 or args.warmup < 0:
        parser.error("--repeats, --steps and --threads must be positive, --warmup not negative")
    try:
        args.shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        args.shapes = []
    if not args.shapes or any(len(s) < 2 or min(s) < 1 for s in args.shapes):
        parser.error("--shapes takes a comma list of shapes like 64x24x24x6 or 64x120 (positive, rank >= 2)")
    args.backends = [b for b in args.backends.split(",") if b]
    if not args.backends or set(args.backends) - set(BACKENDS):
        parser.error(f"--backends takes a comma list of {', '.join(BACKENDS)}")
    return args


def _steps_of(backend: str, shape: tuple[int, ...], x, dy, args) -> dict:
    """``mode|conditional`` and ``mode|unconditional`` -> a callable running ``args.steps`` steps."""
    import keras_bn
    from keras_bn import layer as layer_module

    threshold = layer_module.CONDITIONAL_REFINEMENT_VALUES
    variants = {}
    for name, forced in (("conditional", 0), ("unconditional", math.inf)):
        layer_module.CONDITIONAL_REFINEMENT_VALUES = forced  # read while tracing: each step is traced now, below
        if backend == "tensorflow":
            import tensorflow as tf
            from _steps import tf_batch_norm_step  # bench/_steps.py

            for mode, jit in (("tf.function", False), ("tf xla", True)):
                step = tf_batch_norm_step(keras_bn.BatchNorm(fused=False), tf.constant(x), tf.constant(dy), jit=jit)
                step()
                variants[f"{mode}|{name}"] = step
        else:
            import jax
            import jax.numpy as jnp

            layer = keras_bn.BatchNorm(fused=False)
            layer.build(shape)
            weights = [v.value for v in layer.trainable_variables]
            stats = [v.value for v in layer.non_trainable_variables]

            @jax.jit
            def train_step(weights, stats, x, dy, layer=layer):
                def forward(weights, x):
                    return layer.stateless_call(weights, stats, x, training=True)

                y, pullback, new_stats = jax.vjp(forward, weights, x, has_aux=True)
                return y, pullback(dy), new_stats

            xj, dyj = jnp.asarray(x), jnp.asarray(dy)

            def step(train_step=train_step, weights=weights, stats=stats, xj=xj, dyj=dyj):
                return jax.block_until_ready(train_step(weights, stats, xj, dyj))

            step()
            variants[f"jax jit|{name}"] = step
    layer_module.CONDITIONAL_REFINEMENT_VALUES = threshold
    return {key: _repeated(step, args.steps) for key, step in variants.items()}


def _repeated(step, steps: int):
    def run():
        for _ in range(steps):
            step()

    return run


def child_main(args) -> int:
    import numpy as np

    if args.child == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_bn.layer import CONDITIONAL_REFINEMENT_VALUES as threshold

    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        x = (0.5 + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        seconds = interleaved_rounds(_steps_of(args.child, shape, x, dy, args), args.repeats, args.warmup)
        for mode in dict.fromkeys(key.split("|")[0] for key in seconds):
            a, b = seconds[f"{mode}|conditional"], seconds[f"{mode}|unconditional"]
            low, high, coverage = ratio_interval(a, b, True)
            winner = "conditional" if high < 1 else "unconditional" if low > 1 else "tie"
            rule = "conditional" if math.prod(shape) >= threshold else "unconditional"
            rows.append(
                {"shape": list(shape), "values": math.prod(shape), "mode": mode}
                | {"conditional_ms": 1e3 * statistics.median(a) / args.steps}
                | {"unconditional_ms": 1e3 * statistics.median(b) / args.steps}
                | {"ratio": paired_ratio(a, b), "interval": [low, high], "coverage": coverage}
                | {"winner": winner, "rule": rule, "threshold": threshold}
            )
    print(_JSON_MARK + json.dumps(rows), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    print(f"machine: {describe_machine()} (figures hold for this CPU only)", flush=True)
    rows = []
    for backend in args.backends:
        env = os.environ | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        done = subprocess.run([*command, "--child", backend], env=env, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_JSON_MARK)]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"bench_refinement_threshold: the {backend} child failed (exit {done.returncode})")
        rows += json.loads(lines[-1][len(_JSON_MARK) :])
    if args.repeats < 7:
        print("SMOKE RUN: fewer than 7 rounds, not a result")
    threshold = rows[0]["threshold"]
    print(f"CONDITIONAL_REFINEMENT_VALUES = {threshold}; {args.repeats} interleaved rounds, {args.steps} steps each")
    print(
        f"{'shape':12s} {'values':>8s} {'mode':12s} {'cond ms':>8s} {'uncond ms':>9s} {'ratio':>6s} "
        f"{'95% interval':>13s} {'measured':>13s} {'rule':>13s}"
    )
    for r in rows:
        agree = "" if r["winner"] in ("tie", r["rule"]) else "  RULE WRONG"
        print(
            f"{'x'.join(map(str, r['shape'])):12s} {r['values']:8d} {r['mode']:12s} {r['conditional_ms']:8.3f} "
            f"{r['unconditional_ms']:9.3f} {r['ratio']:6.3f} {r['interval'][0]:6.3f}..{r['interval'][1]:.3f} "
            f"{r['winner']:>13s} {r['rule']:>13s}{agree}"
        )
    print("ratio: conditional / unconditional time, median of per-round ratios; tie: the interval spans 1")
    if args.json:
        settings = {"repeats": args.repeats, "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
        result = {"machine": machine_info(), "machine_as_run": describe_machine(), "settings": settings, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
