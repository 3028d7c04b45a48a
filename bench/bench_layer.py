"""Forward+backward time of one BN layer: keras_bn.BatchNorm (fused and generic) vs Keras' built-in
vs torch.nn.BatchNorm2d, side by side in one run.

One training step of the layer alone on a 64x56x56x64 float32 batch (NHWC for Keras, NCHW for
torch): y = bn(x, training=True), loss = sum(y * g) for a fixed cotangent g, gradients with
respect to x, gamma and beta, moving statistics updated. Keras variants run as one
``tf.function`` each (as ``model.fit`` runs them), optionally also with ``jit_compile=True``
(``--xla``: what ``model.fit`` uses by default on GPUs). Rounds are interleaved (every variant
once per round, in rotating order), so load drift on a shared machine hits all variants alike;
each variant's median over rounds is reported with its ratio to Keras' built-in layer, plus the
median of the per-round ratios (robust to drift between rounds).

Thread counts are set explicitly before any op runs and printed.

    nice -n 10 python bench/bench_layer.py                 # defaults: 15 rounds, 2 threads
    python bench/bench_layer.py --repeats 5 --xla          # quicker, plus XLA variants
    python bench/bench_layer.py --shape 32,28,28,32 --json out.json
    python bench/bench_layer.py --repeats 0 --accuracy      # accuracy table only
    python bench/bench_layer.py --isa avx2                  # kernels capped at AVX2 (bench/_isa.py)

``--accuracy`` adds a table (untimed) of each layer's batch-variance and output error against the
float64 spec for x = offset + N(0, 1) at offsets 1 to 1e4, on a 64x14x14x16 float32 batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from _isa import ISAS, apply_isa, describe_isa, isa_record  # noqa: E402  (bench/_isa.py)
from _steps import tf_batch_norm_step  # noqa: E402  (bench/_steps.py)
from _timing import interleaved_rounds, paired_ratio  # noqa: E402  (bench/_timing.py)

from export.machine import describe_machine, machine_info  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each variant once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (tracing, allocation)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for TF and torch")
    parser.add_argument("--shape", default="64,56,56,64", help="N,H,W,C of the batch")
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True variants")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.nn.BatchNorm2d")
    parser.add_argument("--accuracy", action="store_true", help="also: variance/output error vs spec at large offsets")
    parser.add_argument("--isa", choices=tuple(ISAS), default="native", help="cap the kernels' ISA (bench/_isa.py)")
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args()


def main() -> int:
    args = _parse()
    n, h, w, c = (int(v) for v in args.shape.split(","))
    apply_isa(args.isa)  # before TF and torch import: each reads its cap once
    isa = isa_record(args.isa, machine_info())

    import tensorflow as tf

    # Before any TF op: thread pools are fixed at first use.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.get_logger().setLevel("ERROR")  # one tf.function per variant is intended, not retracing
    import keras
    import numpy as np

    import keras_bn

    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch.set_num_interop_threads(1)
        except ImportError:
            torch = None

    rng = np.random.default_rng(0)
    x_np = (0.5 + rng.standard_normal((n, h, w, c))).astype(np.float32)
    g_np = rng.standard_normal((n, h, w, c)).astype(np.float32)
    x, g = tf.constant(x_np), tf.constant(g_np)

    def keras_step(layer, jit):
        return tf_batch_norm_step(layer, x, g, jit=jit)

    variants = {
        "keras builtin": keras_step(keras.layers.BatchNormalization(), False),
        "ours fused": keras_step(keras_bn.BatchNorm(fused=True), False),
        "ours generic": keras_step(keras_bn.BatchNorm(fused=False), False),
    }
    if args.xla:
        variants["keras builtin xla"] = keras_step(keras.layers.BatchNormalization(), True)
        variants["ours xla"] = keras_step(keras_bn.BatchNorm(), True)
    if torch is not None:
        bn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
        xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).requires_grad_(True)
        gt = torch.from_numpy(np.ascontiguousarray(g_np.transpose(0, 3, 1, 2)))

        def torch_run():
            xt.grad = bn.weight.grad = bn.bias.grad = None
            y = bn(xt)
            y.backward(gt)
            return y, xt.grad, bn.weight.grad, bn.bias.grad

        variants["torch BatchNorm2d (NCHW)"] = torch_run

    # Agreement check (untimed): every variant computes the same y and gradients.
    outputs = {
        name: [np.asarray(v.detach() if hasattr(v, "detach") else v) for v in run()] for name, run in variants.items()
    }
    reference = outputs["keras builtin"]
    agreement = {}
    for name, out in outputs.items():
        if name.startswith("torch"):
            out = [out[0].transpose(0, 2, 3, 1), out[1].transpose(0, 2, 3, 1), out[2], out[3]]
        agreement[name] = max(
            float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
            for a, b in zip(out, reference, strict=True)
        )

    names = list(variants) if args.repeats > 0 else []
    times = interleaved_rounds({name: variants[name] for name in names}, args.repeats, args.warmup)

    base = times.get("keras builtin")
    results = {}
    for name in names:
        median = statistics.median(times[name])
        results[name] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(times[name]),
            "ratio_to_keras": median / statistics.median(base),
            "median_round_ratio": paired_ratio(times[name], base),
            "max_rel_diff_vs_keras": agreement[name],
        }

    print(f"machine: {describe_isa(isa, describe_machine())} (figures hold for this CPU and ISA only)")
    print(f"batch {n}x{h}x{w}x{c} float32, fwd+bwd+moving-stat update, {args.repeats} rounds ({args.warmup} warm-up)")
    print(
        f"threads: TF intra_op={tf.config.threading.get_intra_op_parallelism_threads()} "
        f"inter_op={tf.config.threading.get_inter_op_parallelism_threads()}"
        + (
            f"; torch set_num_threads={torch.get_num_threads()} interop=1, "
            f"ATen kernels {torch.backends.cpu.get_cpu_capability()}"
            if torch is not None
            else ""
        )
        + f"; os.cpu_count()={os.cpu_count()}"
    )
    print(
        f"versions: python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}"
        + (f", torch {torch.__version__}" if torch is not None else "")
    )
    header = f"{'variant':28s} {'median ms':>10s} {'min ms':>9s} {'time/keras':>11s} {'round ratio':>12s}"
    header += f" {'max rel diff':>13s}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:28s} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['ratio_to_keras']:11.2f} "
            f"{r['median_round_ratio']:12.2f} {r['max_rel_diff_vs_keras']:13.1e}"
        )
    print("time/keras < 1 means faster than keras.layers.BatchNormalization; max rel diff: outputs and gradients")
    accuracy = _accuracy(keras, keras_bn, np, torch) if args.accuracy else None
    if args.json:
        with open(args.json, "w") as fh:
            payload = {"machine": machine_info(), "isa": isa, "machine_as_run": describe_isa(isa, describe_machine())}
            payload |= {"shape": [n, h, w, c], "threads": args.threads}
            payload |= {"repeats": args.repeats, "results": results}
            json.dump({**payload, "accuracy": accuracy}, fh, indent=2)
    return 0


def _accuracy(keras, keras_bn, np, torch) -> dict:
    """Relative batch-variance error and max |y - y_spec| per layer for x = offset + N(0, 1)."""
    import spec

    offsets = (1.0, 1e2, 1e3, 1e4)
    shape, rng = (64, 14, 14, 16), np.random.default_rng(1)
    makers = {
        "keras builtin": lambda: keras.layers.BatchNormalization(momentum=0.0),
        "ours fused": lambda: keras_bn.BatchNorm(momentum=0.0, fused=True),
        "ours generic": lambda: keras_bn.BatchNorm(momentum=0.0, fused=False),
    }
    rows = {name: [] for name in makers}
    if torch is not None:
        rows["torch BatchNorm2d"] = []
    for offset in offsets:
        x = (offset + rng.standard_normal(shape)).astype(np.float32)
        y_ref, _, var_ref = spec.batch_norm_train(x, np.ones(16), np.zeros(16), axis=-1, eps=1e-3)
        for name, make in makers.items():
            layer = make()
            y = np.asarray(layer(x, training=True))
            var_error = float(np.max(np.abs(layer.moving_variance.numpy() / var_ref - 1)))
            rows[name].append((var_error, float(np.abs(y - y_ref).max())))
        if torch is not None:
            bn = torch.nn.BatchNorm2d(16, eps=1e-3, momentum=1.0)
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            yt = bn(xt).detach().numpy().transpose(0, 2, 3, 1)
            m = x.size // 16
            var = bn.running_var.numpy().astype(np.float64) * (m - 1) / m
            rows["torch BatchNorm2d"].append(
                (float(np.max(np.abs(var / var_ref - 1))), float(np.abs(yt - y_ref).max()))
            )
    print("\naccuracy vs float64 spec, x = offset + N(0, 1), 64x14x14x16 float32: rel. var error / max |y error|")
    print(f"{'variant':28s}" + "".join(f"{'offset ' + format(o, 'g'):>22s}" for o in offsets))
    for name, cells in rows.items():
        print(f"{name:28s}" + "".join(f"{v:>12.1e} /{e:>8.1e}" for v, e in cells))
    return {
        name: [
            {"offset": o, "var_rel_error": v, "y_max_abs_error": e} for o, (v, e) in zip(offsets, cells, strict=True)
        ]
        for name, cells in rows.items()
    }


if __name__ == "__main__":
    sys.exit(main())
