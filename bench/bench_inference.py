"""Inference speed of LeNet-BN across runtimes: batch-1 latency and batch-1000 throughput, side by side.

One trained-ish LeNet-BN (our Keras BatchNorm, one short epoch on MNIST so the statistics are real),
its PyTorch twin (``torch_ref.keras_to_torch``) and its four ONNX exports
(``export.onnx.exporters.export_all``), timed in one process:

- ``keras.predict``: ``model.predict(x, batch_size=len(x))``, the user-facing Keras path (it builds
  a data adapter and callbacks per call: tens of ms at batch 1), and ``predict_on_batch`` without them;
- ``tf.function``: ``tf.function(lambda x: model(x, training=False))`` with a ``(None, 28, 28, 1)``
  signature, traced once before timing;
- ``torch eval``: PyTorch eager, ``eval()`` + ``no_grad`` (NCHW copy of the input included), with
  ``torch_ref``'s BatchNorm and, as ``torch eval (nn.BatchNorm)``, the same weights in ATen's;
- ``ort:<form>``: ONNX Runtime CPU on each export, graph optimizations ON (``ORT_ENABLE_ALL``, the
  deployment setting; ORT then fuses an unfolded Conv+BN itself), and for the two BN-node forms also
  with optimizations OFF (``ORT_DISABLE_ALL``: the graph as exported, BN kernels run);
- ``litert`` (deploy extra): ``model.export(format="litert")``, float32, run by the LiteRT interpreter
  with its default XNNPACK delegate, one interpreter per batch size (resizing is not timed);
- ``openvino:<form>`` (deploy extra): OpenVINO's CPU plugin compiling each ONNX file, precision hint
  f32 (its default is bf16 on AMX/AVX512_BF16 CPUs, which would not be the float32 network).

Every call goes from a NumPy array in to a NumPy array out. Runtimes are timed in interleaved
rounds (each round times every runtime once, in rotating order) so load drift on a shared machine
hits all of them alike; figures are medians over all calls. Ratios are time / time of
``ort:torch-folded`` (the deployment form): 3.0 means three times slower than it, 0.5 twice as fast.

Threads are set explicitly before any work: TensorFlow intra-op = ``--threads``, inter-op = 1;
``torch.set_num_threads(--threads)``, inter-op 1; ORT ``intra_op_num_threads=--threads``,
``inter_op_num_threads=1``; LiteRT ``num_threads=--threads``; OpenVINO ``INFERENCE_NUM_THREADS=--threads``.
All are printed, with the CPU (``export.machine.describe_machine``).

    nice -n 10 python bench/bench_inference.py                    # 1 thread, MNIST from ../shared/data
    python bench/bench_inference.py --threads 2 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
BASELINE = "ort:torch-folded"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for TF, torch and ORT (default 1)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST IDX directory")
    parser.add_argument("--batch", type=int, default=1000, help="throughput batch size (default 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--latency-calls", type=int, default=50, help="batch-1 calls per runtime per round")
    parser.add_argument("--throughput-calls", type=int, default=3, help="big-batch calls per runtime per round")
    parser.add_argument("--bn", choices=["ours", "keras"], default="ours", help="Keras BN layer (default ours)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--threads, --batch and --rounds must be >= 1")
    return args


def set_threads(threads: int) -> dict[str, str]:
    """Fix every runtime's thread pools before anything runs; returns what was set, for the printout."""
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return {
        "tensorflow": f"intra_op={tf.config.threading.get_intra_op_parallelism_threads()} "
        f"inter_op={tf.config.threading.get_inter_op_parallelism_threads()}",
        "torch": f"num_threads={torch.get_num_threads()} interop={torch.get_num_interop_threads()}",
        "onnxruntime": f"intra_op_num_threads={threads} inter_op_num_threads=1",
        "litert": f"num_threads={threads}",
        "openvino": f"INFERENCE_NUM_THREADS={threads} INFERENCE_PRECISION_HINT=f32",
    }


def build_models(args: argparse.Namespace, x_train: np.ndarray, y_train: np.ndarray):
    import keras

    import keras_bn
    import torch_ref

    keras.utils.set_random_seed(0)
    model = keras_bn.compile_lenet(keras_bn.lenet_bn(args.bn, seed=0), lr=0.05)
    model.fit(x_train, y_train, batch_size=128, epochs=1, verbose=0)
    torch_model = torch_ref.lenet_bn("ours" if args.bn == "ours" else "torch")
    torch_ref.keras_to_torch(model, torch_model)
    return model, torch_model.eval()


def make_runners(model, torch_model, files: dict[str, Path], threads: int) -> dict[str, Callable]:
    """name -> f(numpy NHWC float32) -> numpy logits."""
    import onnx
    import tensorflow as tf
    import torch

    from export.onnx.exporters import _with_torch_batch_norm
    from export.runtimes import onnx_layout, ort_session
    from torch_ref.batch_norm import _BatchNorm

    serve = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32)]
    )

    def torch_eval(module):
        def run(x):
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()

        return run

    runners: dict[str, Callable] = {
        "keras.predict": lambda x: model.predict(x, batch_size=len(x), verbose=0),
        "keras.predict_on_batch": lambda x: np.asarray(model.predict_on_batch(x)),
        "tf.function": lambda x: serve(tf.constant(x)).numpy(),
        "torch eval": torch_eval(torch_model),
    }
    if any(isinstance(m, _BatchNorm) for m in torch_model.modules()):
        # the same weights with ATen's batch norm (torch.nn.BatchNorm*d), as the ONNX export sees them
        runners["torch eval (nn.BatchNorm)"] = torch_eval(_with_torch_batch_norm(torch_model).eval())

    def ort_runner(path: Path, optimize: bool):
        session = ort_session(path, threads=threads, optimize=optimize)
        nchw = onnx_layout(onnx.load(str(path))) == "NCHW"
        return lambda x: session.run(None, {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x})[0]

    for form, path in files.items():
        runners[f"ort:{form}"] = ort_runner(path, optimize=True)
    for form in ("keras", "torch"):
        runners[f"ort:{form} (no graph opt)"] = ort_runner(files[form], optimize=False)
    return runners


def make_deploy_runners(model, files: dict[str, Path], threads: int, tmp: Path) -> tuple[dict[str, Callable], list]:
    """LiteRT and OpenVINO runners (the deploy extra); returns (runners, [(skipped runtime, reason)])."""
    import onnx

    from export.runtimes import _interpreter, export_litert, missing_module, onnx_layout

    runners: dict[str, Callable] = {}
    skipped = []
    reason = missing_module("ai_edge_litert")
    if reason:
        skipped.append(("litert", reason))
    else:
        tflite = export_litert(model, tmp / "lenet_bn.tflite")
        interpreters: dict[int, tuple] = {}

        def litert(x):
            if len(x) not in interpreters:  # one interpreter per batch size: no resize inside the timed calls
                interpreter = _interpreter(tflite, threads)
                (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
                interpreter.resize_tensor_input(source["index"], list(x.shape))
                interpreter.allocate_tensors()
                interpreters[len(x)] = (interpreter, source["index"], target["index"])
            interpreter, source, target = interpreters[len(x)]
            interpreter.set_tensor(source, x)
            interpreter.invoke()
            return interpreter.get_tensor(target)

        runners["litert"] = litert
    reason = missing_module("openvino")
    if reason:
        skipped.append(("openvino:*", reason))
    else:
        import openvino

        core = openvino.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        for form, path in files.items():
            request = core.compile_model(str(path), "CPU", config).create_infer_request()
            nchw = onnx_layout(onnx.load(str(path))) == "NCHW"

            def run(x, request=request, nchw=nchw):
                request.infer({0: np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x})
                return request.get_output_tensor(0).data.copy()

            runners[f"openvino:{form}"] = run
    return runners, skipped


def _deploy_versions() -> str:
    import importlib.metadata

    found = []
    for name in ("ai-edge-litert", "openvino"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def time_rounds(runners: dict[str, Callable], inputs: list[np.ndarray], rounds: int, calls: int) -> dict[str, list]:
    """Per-call seconds for every runner, interleaved: each round times every runner ``calls`` times."""
    names = list(runners)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            run = runners[name]
            for k in range(calls):
                x = inputs[(r * calls + k) % len(inputs)]
                start = time.perf_counter()
                run(x)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    import keras
    import onnxruntime
    import tensorflow as tf
    import torch

    from export.agreement import compare_pair
    from export.machine import describe_machine, machine_info
    from export.onnx.exporters import export_all
    from mnist_data import load_dataset, to_nhwc_float

    if (args.data_dir / "t10k-images-idx3-ubyte.gz").exists() or args.data_dir.is_dir():
        data = load_dataset("mnist", data_dir=args.data_dir)
    else:
        print(f"no MNIST at {args.data_dir}; using the embedded digits", file=sys.stderr)
        data = load_dataset("digits")
    x_train, x_test = to_nhwc_float(data.x_train[:4096]), to_nhwc_float(data.x_test)
    model, torch_model = build_models(args, x_train, data.y_train[:4096])

    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(model, torch_model, tmp)
        runners = make_runners(model, torch_model, files, args.threads)
        deploy, skipped = make_deploy_runners(model, files, args.threads, Path(tmp))
        runners.update(deploy)
        singles = [x_test[i : i + 1] for i in range(64)]
        second = x_test[args.batch : 2 * args.batch]
        big = [x_test[: args.batch], second if len(second) == args.batch else x_test[: args.batch]]
        # warm-up (tracing, allocator, ORT's first-run work) and a sanity check that all runners agree
        reference = runners[BASELINE](big[0])
        for name, run in runners.items():
            run(singles[0])
            pair = compare_pair(name, run(big[0]), BASELINE, reference)
            if not pair.passed:
                raise SystemExit(f"runner disagrees before timing: {pair.describe()}")
        load_before = os.getloadavg()
        latency = time_rounds(runners, singles, args.rounds, args.latency_calls)
        throughput = time_rounds(runners, big, args.rounds, args.throughput_calls)
        load_after = os.getloadavg()

    rows = []
    base_latency = statistics.median(latency[BASELINE])
    base_batch = statistics.median(throughput[BASELINE])
    for name in runners:
        lat, batch = statistics.median(latency[name]), statistics.median(throughput[name])
        rows.append(
            {
                "runtime": name,
                "batch1_median_ms": lat * 1e3,
                "batch1_p90_ms": float(np.percentile(latency[name], 90)) * 1e3,
                f"batch{args.batch}_median_ms": batch * 1e3,
                "images_per_s": args.batch / batch,
                "latency_vs_baseline": lat / base_latency,
                "time_vs_baseline_at_batch": batch / base_batch,
            }
        )

    print(f"LeNet-BN ({args.bn} BN) inference on {data.name} test images")
    print(describe_machine())
    print(
        f"versions: python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {_deploy_versions()}"
    )
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}")
    print("threads: " + "; ".join(f"{k} {v}" for k, v in threads.items()))
    print(f"load average before/after timing: {load_before[0]:.2f} / {load_after[0]:.2f} (shared machine)")
    print(
        f"{args.rounds} interleaved rounds: {args.latency_calls} batch-1 calls and {args.throughput_calls} "
        f"batch-{args.batch} calls per runtime per round; medians; ratios are runtime / {BASELINE} (1.0 = as fast)"
    )
    header = (
        f"| runtime | batch-1 median ms | p90 ms | x {BASELINE} | batch-{args.batch} ms | images/s | x {BASELINE} |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['runtime']} | {row['batch1_median_ms']:.3f} | {row['batch1_p90_ms']:.3f} | "
            f"{row['latency_vs_baseline']:.2f} | {row[f'batch{args.batch}_median_ms']:.2f} | "
            f"{row['images_per_s']:.0f} | {row['time_vs_baseline_at_batch']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_info(),  # CPU model, vector extensions, cores (export/machine.py)
                    "baseline": BASELINE,
                    "threads": threads,
                    "batch": args.batch,
                    "rounds": args.rounds,
                    "skipped": [{"runtime": n, "reason": r} for n, r in skipped],
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
