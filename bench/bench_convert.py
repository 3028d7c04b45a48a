"""Whole-network conversion, Keras <-> PyTorch: how exact, and how long it takes, for the issue's seven models.

Models (weights=None, 10 classes, BN statistics moved by two training-mode passes on 32 MNIST test
images, tiled to RGB and resized): Keras -> PyTorch (``torch_ref.from_keras``) ``keras.applications``
ResNet50, MobileNetV2, EfficientNetB0, DenseNet121; PyTorch -> Keras (``keras_bn.from_torch``)
torchvision's ResNet-18 and MobileNetV2 (tests/_torch_models.py) and efficientnet-pytorch's B0.

Per model, with ``export.agreement.compare_pair``'s measure (max |Δ| / max(1, max |logit|)):

- ``float64``: source vs converted logits, float64 on both sides, ``--f64-images`` images;
- ``float32``: the same in float32 on ``--images`` images, with argmax agreement;
- ``train_step``: from identical float64 weights, one SGD step with momentum (batch 16, the tests'
  lr 0.0625, momentum 0.875) in each framework (Keras ``model.fit``, a PyTorch loop): the worst
  difference over every parameter and running statistic afterwards (None for models with dropout,
  whose masks the two frameworks draw differently);
- ``onnx_kept`` / ``onnx_folded``: ONNX Runtime (float32, graph optimizations off as in
  ``export.runtimes.run_ort``) on the PyTorch side's exports (``export_torch``, dynamo: BN nodes
  kept, and folded by the exporter, with the BN it cannot fold as affine Mul/Add: DenseNet121's
  pre-activation BNs after concatenations) vs the Keras float32 logits. A Keras source exports its
  ``from_keras`` module with plain BNs (``tests._convert_models.onnx_exportable``: same inference;
  a convention-carrying BN would export as elementwise ops). ``export_keras`` (tf2onnx) is not
  used: its BN restoration does not find MobileNetV2's projection BNs;
- timings: conversion (one run: seconds), and inference medians over ``--rounds`` interleaved
  calls of batch ``--batch`` for Keras (``predict_on_batch``), PyTorch eager and ORT (graph
  optimizations on, the deployment setting), with each runtime's ratio to ORT on the folded export.

    nice -n 10 python bench/bench_convert.py --json docs/results/convert.json
    nice -n 10 python bench/bench_convert.py --json docs/results/convert.json --models DenseNet121  # its row only

``--models`` with an existing ``--json`` replaces those rows in place and keeps the others. An ONNX
export that fails leaves the row's ONNX figures None with ``onnx_error`` saying why. A model that
fails is reported and skipped; the JSON is rewritten after every model.

Threads: TF intra-op 1, inter-op 1; torch 1; ORT 1 (printed with the CPU).
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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/_torch_models.py and tests/_convert_models.py hold the fixtures

import numpy as np  # noqa: E402

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
KERAS_MODELS = {  # name -> (keras.applications constructor name, input size)
    "ResNet50": ("ResNet50", 64),
    "MobileNetV2": ("MobileNetV2", 96),
    "EfficientNetB0": ("EfficientNetB0", 64),
    "DenseNet121": ("DenseNet121", 64),
}
TORCH_MODELS = {"ResNet-18": 64, "MobileNetV2 (torchvision)": 96, "EfficientNet-B0 (efficientnet-pytorch)": 64}
DROPOUT = {"EfficientNetB0", "MobileNetV2 (torchvision)", "EfficientNet-B0 (efficientnet-pytorch)"}
BASELINE = "ort:folded"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="directory holding mnist/ IDX files")
    parser.add_argument("--images", type=int, default=256, help="float32 images compared (default 256)")
    parser.add_argument("--f64-images", type=int, default=32, help="float64 images compared (default 32)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the timed inference calls (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--models", nargs="*", help="only these model names")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def _torch_module(name: str):
    from tests._torch_models import MobileNetV2, ResNet18, efficientnet_b0

    if name == "ResNet-18":
        return ResNet18(10)
    if name.startswith("MobileNetV2"):
        return MobileNetV2(10)
    return efficientnet_b0(10, TORCH_MODELS[name])


def _measure(name: str, args: argparse.Namespace) -> dict:
    """Every figure of one model (module docstring)."""

    import keras
    import torch

    import keras_bn
    from export.agreement import compare_pair
    from export.onnx.exporters import export_torch
    from export.runtimes import ort_session, run_ort
    from tests._convert_models import (
        floatx,
        mnist_images,
        mnist_labels,
        onnx_exportable,
        train_keras,
        train_torch,
        worst_weight_difference,
    )
    from torch_ref import from_keras

    keras_to_torch = name in KERAS_MODELS
    size = KERAS_MODELS[name][1] if keras_to_torch else TORCH_MODELS[name]
    data = args.data_dir
    move = mnist_images(data, 32, size, "float64", offset=args.images)
    x64 = mnist_images(data, args.f64_images, size, "float64")
    x32 = mnist_images(data, args.images, size, "float32")

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def torch_logits(module, x, layout_nchw):
        with torch.no_grad():
            return module(nchw(x) if layout_nchw else torch.from_numpy(x)).numpy()

    def build(dtype: str):
        """(keras model, torch module, torch takes NCHW, conversion seconds) with the statistics moved."""
        if keras_to_torch:
            keras.utils.set_random_seed(0)
            with floatx(dtype):
                model = getattr(keras.applications, KERAS_MODELS[name][0])(
                    weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
                )
            for chunk in np.array_split(move.astype(dtype), 2):
                model(chunk, training=True)
            start = time.perf_counter()
            module = from_keras(model)
            return model, module, False, time.perf_counter() - start
        torch.manual_seed(0)
        module = _torch_module(name).double().train()
        with torch.no_grad():
            for chunk in np.array_split(move, 2):
                module(nchw(chunk))
        module = module.eval().to(getattr(torch, dtype))
        start = time.perf_counter()
        model = keras_bn.from_torch(module, (3, size, size))
        return model, module, True, time.perf_counter() - start

    model64, module64, is_nchw, _ = build("float64")
    source_is_keras = keras_to_torch
    k64 = keras.ops.convert_to_numpy(model64(x64))
    t64 = torch_logits(module64, x64, is_nchw)
    float64 = compare_pair("keras", k64, "torch", t64).max_rel
    bn_layers = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in _all_layers(model64))

    train_step = None
    if name not in DROPOUT:
        images = mnist_images(data, 16, size, "float64", offset=args.images + 32)
        labels = mnist_labels(data, 16, offset=args.images + 32)
        train_torch(module64, nchw(images).numpy() if is_nchw else images, labels)
        train_keras(model64, images, labels)
        if source_is_keras:
            expected, actual = _state(from_keras(model64)), _state(module64)
            train_step = max(float(np.abs(expected[k] - actual[k]).max()) for k in expected)
        else:
            train_step = worst_weight_difference(model64, keras_bn.from_torch(module64.eval(), (3, size, size)))

    model32, module32, is_nchw, convert_s = build("float32")
    k32 = keras.ops.convert_to_numpy(model32.predict(x32, batch_size=64, verbose=0))
    t32 = np.concatenate([torch_logits(module32, chunk, is_nchw) for chunk in np.array_split(x32, 4)])
    float32 = compare_pair("keras", k32, "torch", t32)
    with tempfile.TemporaryDirectory() as tmp:
        exportable = module32 if is_nchw else onnx_exportable(model32)
        files, onnx_error = {}, None
        for form, fold in (("ort:kept", False), ("ort:folded", True)):
            try:
                files[form] = export_torch(
                    exportable, Path(tmp) / f"{form}.onnx", fold=fold, input_shape=(3, size, size)
                )
            except RuntimeError as error:  # the exporter fails on a graph: the row says why, the others still run
                onnx_error = str(error)  # (a BN with nothing to fold into is no failure: it becomes Mul/Add)
                break
        onnx = {
            form: compare_pair(form, run_ort(path, x32, batch_size=64), "keras", k32) for form, path in files.items()
        }
        timings = _time_inference(model32, module32, is_nchw, files, x32[: args.batch], args.rounds, ort_session)
    row = {
        "model": name,
        "direction": "keras->torch" if keras_to_torch else "torch->keras",
        "input": [size, size, 3],
        "bn_layers": bn_layers,
        "float64_max_rel": float64,
        "float32_max_rel": float32.max_rel,
        "float32_argmax_agreement": float32.argmax_agreement,
        "float32_images": float32.n,
        "train_step_max_abs": train_step,
        "onnx_kept_max_rel": onnx["ort:kept"].max_rel if "ort:kept" in onnx else None,
        "onnx_folded_max_rel": onnx["ort:folded"].max_rel if "ort:folded" in onnx else None,
        "onnx_error": onnx_error,
        "onnx_argmax_agreement": min((p.argmax_agreement for p in onnx.values()), default=None),
        "convert_s": convert_s,
        "inference_ms": timings,
        "inference_vs_baseline": {k: v / timings[BASELINE] for k, v in timings.items()} if BASELINE in timings else {},
    }
    print(json.dumps(row), flush=True)
    return row


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def _time_inference(model, module, is_nchw, files, x, rounds, ort_session) -> dict[str, float]:
    """Median ms per call of each runtime on one batch, timed in interleaved rounds."""
    import torch

    feed = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if is_nchw else x)
    sessions = {form: ort_session(path, threads=1, optimize=True) for form, path in files.items()}

    def ort(session):
        name = session.get_inputs()[0].name
        feed = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # both exports take NCHW
        return lambda: session.run(None, {name: feed})

    def eager():
        with torch.no_grad():
            module(feed)

    calls = {
        "keras": lambda: model.predict_on_batch(x),
        "torch": eager,
        **{form: ort(session) for form, session in sessions.items()},
    }
    for call in calls.values():  # warm-up: graph tracing, allocator
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf
    import torch

    from export.machine import describe_machine, machine_info

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    machine = describe_machine()
    print(f"machine: {machine}; python {platform.python_version()}, threads: TF 1/1, torch 1, ORT 1", flush=True)
    names = args.models or [*TORCH_MODELS, *KERAS_MODELS]
    rows: list[dict] = []
    if args.json and args.json.exists() and args.models:  # a partial rerun replaces its models' rows only
        rows = json.loads(args.json.read_text())["rows"]
    order = [row["model"] for row in rows]  # a replaced row keeps its place (the README table's order)
    rows = [row for row in rows if row["model"] not in names]
    info = machine_info()
    for name in names:
        try:
            rows.append(_measure(name, args))
            rows.sort(key=lambda row: order.index(row["model"]) if row["model"] in order else len(order))
        except Exception as error:  # one model's failure is reported, the others still run
            print(f"{name}: FAILED {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        if args.json:  # after every model: a long run stopped early keeps what it measured
            result = {
                "machine": f"{info['cpu_model']}, {info['usable_cpus']} CPUs ({' '.join(info['vector_extensions'])})",
                "command": "nice -n 10 python bench/bench_convert.py --json docs/results/convert.json",
                "versions": {"tensorflow": tf.__version__, "torch": torch.__version__},
                "images": args.images,
                "f64_images": args.f64_images,
                "batch": args.batch,
                "rounds": args.rounds,
                "baseline": BASELINE,
                "rows": rows,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
