"""Keras vs PyTorch LeNet-BN, step for step: long lockstep training runs and inference agreement on MNIST.

The long version of tests/test_torch_conformance.py. Keras: keras_bn.BatchNorm(convention="torch",
momentum=0.1, epsilon=1e-5); PyTorch: torch.nn.BatchNorm*d (SGD runs) or torch_ref.BatchNorm*d
(Adam runs). Both start from the same weights and train on the same MNIST *training* batches in
the same order with matched optimizers (tests/lockstep.py). After every step each parameter and
moving statistic is compared; the table prints the maximum |keras - torch| over each window of
``--every`` steps, the tensor where it occurred and how many ReLU/max-pool decisions PyTorch took
differently (overridden in "routed" runs, counted only there). Then the Keras model trained by the
first run is copied into fresh PyTorch models (ours and torch.nn) and both frameworks' logits are
compared on all 10,000 MNIST test images.

Runs: float32 free-running (what a user gets), float32 routed (PyTorch follows Keras' ReLU/pool
decisions: the arithmetic alone), float64 free-running (the conventions alone), for SGD(0.05,
momentum 0.9) and Adam(1e-3, eps 1e-7 applied the Keras way). Threads: 1 intra-op and 1 inter-op
for TensorFlow, 1 for torch (divergence, not speed, is measured; printed below).

    nice -n 10 python bench/bench_conformance.py                    # 300 steps per run
    python bench/bench_conformance.py --steps 100 --runs float32-sgd-free,float64-sgd --log steps.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from export.machine import describe_machine, machine_info  # noqa: E402

# The lockstep harness is test infrastructure (tests/lockstep.py); this is its long run.
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

# id: dtype, optimizer, lr, momentum, torch BN, follow Keras' ReLU/pool decisions
RUNS = {
    "float32-sgd-free": ("float32", "sgd", 0.05, 0.9, "torch", False),
    "float32-sgd-routed": ("float32", "sgd", 0.05, 0.9, "torch", True),
    "float64-sgd": ("float64", "sgd", 0.05, 0.9, "torch", False),
    "float32-adam-free": ("float32", "adam", 1e-3, 0.0, "ours", False),
    "float32-adam-routed": ("float32", "adam", 1e-3, 0.0, "ours", True),
    "float64-adam": ("float64", "adam", 1e-3, 0.0, "ours", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--every", type=int, default=25, help="print the max divergence per this many steps")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST IDX directory")
    parser.add_argument("--log", type=Path, help="also write every step's divergence line here")
    parser.add_argument("--json", type=Path, help="also write the summary figures here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs.split(",")) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    return args


def _set_threads() -> str:
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(1)
    return "TF intra-op 1, inter-op 1 (tf.config.threading); torch 1 (torch.set_num_threads)"


def _run(run_id: str, args, images, labels, log):
    import keras

    sys.path.insert(0, str(TESTS_DIR))
    from lockstep import train_lenet_lockstep

    dtype, optimizer, lr, momentum, torch_bn, routed = RUNS[run_id]
    # Keras caches the global dtype policy at the first layer built: set it, not only floatx.
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        start = time.perf_counter()
        keras_model, _, history = train_lenet_lockstep(
            dtype,
            torch_bn,
            images,
            labels,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            eps=1e-7,
            batch_size=args.batch,
            steps=args.steps,
            follow_keras_routing=routed,
            on_step=(lambda e: log.write(f"[{run_id}] {e.line()}\n")) if log else None,
        )
        seconds = time.perf_counter() - start
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous_policy)
    return keras_model, history, seconds


def _window_table(run_id: str, history, every: int) -> dict:
    def core(e) -> float:  # parameter entries BN does not cancel (tests/lockstep.py docstring)
        return e.max_param_bn_variant

    print(f"\n== {run_id}: max |keras - torch| per {every} steps (statistics relative to max(1, |value|))")
    print(f"{'steps':>9}  {'params':>9}  {'BN-variant params':>19}  {'stats rel':>9}  {'worst tensor':18}  flips")
    for lo in range(0, len(history), every):
        window = history[lo : lo + every]
        params = max(e.max_param for e in window)
        stats = max(e.max_stat_relative for e in window)
        worst = max(window, key=lambda e: max(e.per_tensor.values())).worst
        flips = sum(e.routing_flips for e in window) if RUNS[run_id][5] else "-"  # counted when routed only
        print(
            f"{lo + 1:4d}-{lo + len(window):<4d}  {params:9.2e}  {max(core(e) for e in window):19.2e}  "
            f"{stats:9.2e}  {worst:18}  {flips}"
        )
    last = history[-1]
    first_over = next((e.step for e in history if e.max_param > 1e-4), None)
    first_core_over = next((e.step for e in history if core(e) > 1e-4), None)
    print(
        f"final loss keras {last.loss_keras:.6f} torch {last.loss_torch:.6f}; first step with a parameter "
        f"> 1e-4: {first_over} (BN-variant entries only: {first_core_over})"
    )
    return {
        "max_param": max(e.max_param for e in history),
        "max_param_bn_variant": max(core(e) for e in history),
        "max_stat_abs": max(e.max_stat for e in history),
        "max_stat_relative": max(e.max_stat_relative for e in history),
        "first_step_param_over_1e-4": first_over,
        "first_step_param_bn_variant_over_1e-4": first_core_over,
        "routing_flips": sum(e.routing_flips for e in history),
        "final_loss_keras": last.loss_keras,
        "final_loss_torch": last.loss_torch,
    }


def _inference(keras_model, x_test) -> dict:
    import numpy as np
    import torch

    import torch_ref
    from mnist_data import to_nchw_float, to_nhwc_float

    keras_logits = keras_model.predict(to_nhwc_float(x_test), batch_size=1000, verbose=0)
    scale = max(1.0, float(np.abs(keras_logits).max()))
    print(f"\n== inference on {len(x_test)} MNIST test images (Keras model trained by the first run)")
    print(f"{'torch BN':10} {'max|dlogit|':>12} {'/ max(1,|logit|)':>17} {'argmax agree':>13}")
    out = {}
    for kind in ("ours", "torch"):
        torch_model = torch_ref.keras_to_torch(keras_model, torch_ref.lenet_bn(kind)).eval()
        with torch.no_grad():
            torch_logits = torch_model(torch.from_numpy(to_nchw_float(x_test))).numpy()
        diff = float(np.abs(keras_logits - torch_logits).max())
        agree = float(np.mean(keras_logits.argmax(1) == torch_logits.argmax(1)))
        print(f"{kind:10} {diff:12.3e} {diff / scale:17.3e} {agree:13.2%}")
        out[kind] = {"max_abs": diff, "relative": diff / scale, "argmax_agreement": agree}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = _set_threads()
    import keras
    import numpy as np
    import tensorflow as tf
    import torch

    from mnist_data import load_dataset, to_nhwc_float

    data = load_dataset("mnist", data_dir=args.data_dir)
    n = args.steps * args.batch
    images, labels = to_nhwc_float(data.x_train[:n]), data.y_train[:n]
    print(f"keras {keras.__version__} (TF {tf.__version__}), torch {torch.__version__}, numpy {np.__version__}")
    print(f"machine: {describe_machine()}")
    print(f"threads: {threads}")
    print(f"data: {data.source}; training on the first {n} training images, batch {args.batch}")
    log = args.log.open("w") if args.log else None
    summary: dict = {
        "machine": machine_info(),
        "steps": args.steps,
        "batch": args.batch,
        "threads": threads,
        "runs": {},
    }
    trained = None
    try:
        for run_id in args.runs.split(","):
            keras_model, history, seconds = _run(run_id, args, images, labels, log)
            summary["runs"][run_id] = _window_table(run_id, history, args.every) | {"seconds": seconds}
            print(f"({seconds:.0f} s)")
            if trained is None and RUNS[run_id][0] == "float32":
                trained = keras_model
    finally:
        if log:
            log.close()
    if trained is not None:
        summary["inference"] = _inference(trained, data.x_test)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
