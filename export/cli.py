"""``keras-bn run``: the main job a new user runs first.

Train LeNet-BN and the same LeNet without BN with ``model.fit`` (same initial kernels, optimizer and batches), copy
the BN model's weights into PyTorch, export both frameworks to ONNX (BN kept and folded), compare the logits of every
runtime on the test images, and write a report. Exit status: 0 when every runtime pair agrees, 1 when one does not
(the message names the pair and the worst input), 2 for bad input (arguments, data directory, corrupt files, an
output directory holding files we did not write).

Output directory policy: ``--out`` may be new, empty, or hold a previous run's files (only names from
:data:`OUTPUT_NAMES`); then those names are replaced and nothing else is touched. A directory with any other entry is
refused unless ``--force``, and even then only our own names are written: nothing of the user's is deleted or
overwritten.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export import recipes
from export import report as rpt
from export.data import DATASET_NAMES, Dataset, load_dataset, to_nhwc_float

__all__ = ["OUTPUT_NAMES", "build_parser", "main", "run_main_job"]

EXIT_OK, EXIT_DISAGREE, EXIT_USAGE = 0, 1, 2
ONNX_SUBDIR = "onnx"
MODEL_FILES = {"bn": "lenet_bn.keras", "no_bn": "lenet.keras"}
#: Every top-level name the main job writes into --out (ONNX files go into the onnx/ subfolder).
OUTPUT_NAMES = frozenset({rpt.REPORT_JSON, rpt.REPORT_MD, rpt.PLOT_PNG, ONNX_SUBDIR, *MODEL_FILES.values()})


class UsageError(Exception):
    """Bad input from the user: printed as ``keras-bn: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-bn",
        description="Batch Normalization that behaves identically in Keras/TensorFlow, PyTorch and ONNX Runtime.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="train LeNet with and without BN, export to ONNX, check agreement across runtimes, write a report",
        description=(
            "Train LeNet-BN and plain LeNet with model.fit, transfer the BN model to PyTorch, export both frameworks "
            "to ONNX (BN kept as BatchNormalization nodes and folded into Conv/Gemm), compare the logits of every "
            "runtime on the test images, and write report.md, report.json, curves.png, the ONNX files and the "
            "trained Keras models to --out. Exit status 0: all runtimes agree; 1: a runtime pair disagrees beyond "
            "max|Δ| <= 1e-5·max(1, max|logit|) or argmax differs; 2: bad input."
        ),
        epilog=(
            "Without --data-dir the data is the embedded default: scikit-learn's bundled 8x8 handwritten digits "
            "(1,797 images) upscaled to 28x28, first 1,437 for training and last 360 for testing; it works offline. "
            "For MNIST: --dataset mnist --data-dir DIR with the four IDX files (raw or .gz) or Keras' mnist.npz, "
            "or --download to fetch them (md5-checked) into DIR or ~/.cache/keras-bn. "
            "Output policy: --out may be new, empty, or a previous run's output; a directory with other files is "
            "refused unless --force, and nothing but keras-bn's own file names is ever written there."
        ),
    )
    run.add_argument(
        "--model",
        choices=tuple(recipes.RECIPES),
        default="lenet-bn",
        help="which LeNet, trained by its source's recipe (export/recipes.py): lenet-bn (SGD 0.05 momentum 0.9, "
        "batch 32, MNIST), d2l-lenet-bn (SGD 1.0, batch 256, Fashion-MNIST), lenet5 (Adam 1e-3, batch 64, MNIST); "
        "every flag below overrides its recipe (default: lenet-bn)",
    )
    run.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="digits: embedded default (offline); mnist / fashion: needs --data-dir or --download (default: the "
        "recipe's with --data-dir/--download, else digits)",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        help="directory with the IDX files (raw or .gz) or Keras .npz, or a parent with a mnist/ or fashion/ folder; "
        "with --download: the cache directory",
    )
    run.add_argument(
        "--download",
        action="store_true",
        help="download mnist/fashion (md5-verified, atomic writes) into --data-dir or ~/.cache/keras-bn/NAME",
    )
    run.add_argument("--epochs", type=_positive_int, help="training epochs for each model (default: the recipe's)")
    run.add_argument("--batch-size", type=_positive_int, help="training batch size (default: the recipe's)")
    run.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate of the recipe's optimizer, same for both models (default: the recipe's)",
    )
    run.add_argument(
        "--out", type=Path, default=Path("keras-bn-out"), help="output directory (default: ./keras-bn-out)"
    )
    run.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seeds Python, NumPy, TensorFlow and the kernel initializers; both models start alike (default: 0)",
    )
    run.add_argument(
        "--limit",
        type=_positive_int,
        help="use only the first N training and first N test images (quick runs; default: all)",
    )
    run.add_argument(
        "--bn-layer",
        choices=("ours", "keras"),
        default="ours",
        help="Keras BN layer: ours (keras_bn.BatchNorm) or keras (keras.layers.BatchNormalization) (default: ours)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out that holds other files (only keras-bn's own names are written)",
    )
    run.add_argument("--quiet", action="store_true", help="no Keras progress bar and no step messages")
    return parser


# ---------------------------------------------------------------------------------------------------- output dir


def _check_out(out: Path, force: bool) -> None:
    """Check that writing our names into ``out`` loses nothing of the user's (policy in the module docstring)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES)
        if foreign and not force:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UsageError(
                f"--out {out} holds files keras-bn did not write ({shown}); choose a new or empty directory, or pass "
                f"--force to write only keras-bn's own names ({', '.join(sorted(OUTPUT_NAMES))}) beside them"
            )
        onnx_dir = out / ONNX_SUBDIR
        if onnx_dir.exists() and not onnx_dir.is_dir():
            raise UsageError(f"{onnx_dir} exists and is not a directory")


def _install(staged: Path, target: Path) -> None:
    """Move a file produced in the staging directory to its final name (atomic rename on one filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)


# --------------------------------------------------------------------------------------------------- the steps


class _Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[keras-bn] {message}", flush=True)


def _train(
    dataset: Dataset, batch_norm: str | None, args: argparse.Namespace, log: _Log
) -> tuple[Any, dict[str, list[float]], float]:
    """Build, fit and evaluate one LeNet; returns (model, per-epoch history, test accuracy)."""
    import keras

    # Same global seed before each model: same shuffling order and same dropout-free init for both.
    keras.utils.set_random_seed(args.seed)
    model = args.recipe.recipe.build_keras(batch_norm, seed=args.seed, lr=args.lr)
    x_train, x_test = to_nhwc_float(dataset.x_train), to_nhwc_float(dataset.x_test)
    history = model.fit(
        x_train,
        dataset.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, dataset.y_test),
        verbose=0 if args.quiet else 1,
    )
    per_epoch = {k: [float(v) for v in history.history[k]] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    _, test_accuracy = model.evaluate(x_test, dataset.y_test, batch_size=256, verbose=0)
    log(f"{model.name}: test accuracy {100 * test_accuracy:.2f}%")
    return model, per_epoch, float(test_accuracy)


def _to_torch(keras_model: Any) -> Any:
    """The PyTorch twin (our autograd BN) holding exactly the Keras model's weights and moving statistics."""
    import torch_ref

    torch_model = recipes.for_keras_model(keras_model).build_torch()
    torch_ref.keras_to_torch(keras_model, torch_model)
    return torch_model.eval()


def _agreement(keras_model: Any, torch_model: Any, dataset: Dataset, onnx_dir: Path) -> dict[str, Any]:
    """Run export.agreement.compare_runtimes (exports into ``onnx_dir``) and keep what the report needs."""
    from export.agreement import compare_runtimes

    result = compare_runtimes(keras_model, torch_model, to_nhwc_float(dataset.x_test), out_dir=onnx_dir)
    return {
        "runtimes": list(result.runtimes),
        "pairs": result.to_json(),  # a, b, max_abs, max_rel, argmax_agreement, max_abs_logit, worst_index, ...
        "onnx_files": {str(form): Path(path) for form, path in result.onnx_files.items()},
        "passed": bool(result.passed),
        "n_inputs": int(result.n_inputs),
        # export.agreement.RTOL is the bound: max|a - b| <= rtol * max(1, max|logit|), argmax 100%.
        "tolerance": {"rel_to_max_logit": float(result.rtol), "argmax_agreement": 1.0},
    }


def _failure_message(pairs: list[dict[str, Any]]) -> str:
    bad = [p for p in pairs if not p["passed"]]
    worst = max(bad, key=lambda p: (p["argmax_agreement"] < 1.0, p["max_rel"]))
    return (
        f"agreement FAILED for {len(bad)} of {len(pairs)} runtime pairs; worst: {worst['a']} vs {worst['b']}, "
        f"max |Δ| {worst['max_abs']:.3e} > bound {worst['rtol']:.0e}·max(1, max|logit| "
        f"{worst['max_abs_logit']:.3g}) = {worst['tolerance']:.3e} or argmax agreement "
        f"{100 * worst['argmax_agreement']:.2f}% < 100%; worst input: test image {worst['worst_index']} "
        f"(full table in report.md)"
    )


def run_main_job(args: argparse.Namespace) -> int:
    """The ``run`` command; returns the exit status (raises UsageError for bad input)."""
    log = _Log(args.quiet)
    # --model: the recipe supplies every training flag the user left out (export/recipes.py).
    args.recipe = recipes.resolve(
        args.model, dataset=args.dataset, data_dir=args.data_dir, download=args.download, lr=args.lr,
        batch_size=args.batch_size, epochs=args.epochs,
    )  # fmt: skip
    args.dataset, args.lr, args.batch_size, args.epochs = (
        args.recipe.dataset, args.recipe.lr, args.recipe.batch_size, args.recipe.epochs,
    )  # fmt: skip
    if args.dataset == "digits" and (args.data_dir is not None or args.download):
        raise UsageError("--dataset digits is the embedded default; it takes no --data-dir or --download")
    if args.data_dir is not None and not args.download and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist or is not a directory")
    out: Path = args.out
    _check_out(out, args.force)  # before the slow part, but create nothing until the data has loaded
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    try:
        dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:
        raise UsageError(f"cannot load {args.dataset}: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot get {args.dataset}: {exc}") from exc
    if dataset.embedded and args.dataset != "digits":
        print(
            f"[keras-bn] note: no --data-dir given, so --dataset {args.dataset} falls back to the embedded default "
            "(scikit-learn digits upscaled to 28x28); pass --data-dir DIR or --download for real "
            f"{args.dataset} data",
            file=sys.stderr,
        )
    if args.recipe.dataset_note:  # a default, not an error: on stdout like the other steps (report.json keeps it)
        log(f"note: {args.recipe.dataset_note}")
    dataset = dataset.limit(args.limit)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc}") from exc
    timings["load_data"] = time.perf_counter() - t0
    log(f"data: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test; {dataset.source}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    log(f"training {args.recipe.recipe.title} with BN ({args.bn_layer} BN layer), {args.epochs} epochs")
    bn_model, bn_hist, bn_acc = _train(dataset, args.bn_layer, args, log)
    timings["train_bn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"training {args.recipe.recipe.title} without BN, {args.epochs} epochs")
    plain_model, plain_hist, plain_acc = _train(dataset, None, args, log)
    timings["train_no_bn"] = time.perf_counter() - t0

    staging = Path(tempfile.mkdtemp(prefix=".keras-bn-staging-", dir=out))
    try:
        t0 = time.perf_counter()
        log("transferring LeNet-BN to PyTorch, exporting ONNX, comparing runtimes")
        torch_model = _to_torch(bn_model)
        # torch.onnx's exporter warns once per missing torchvision op (nothing here uses torchvision); set after
        # importing torch, whose logging setup resets this logger's level.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        agreement = _agreement(bn_model, torch_model, dataset, staging / ONNX_SUBDIR)
        timings["export_and_agreement"] = time.perf_counter() - t0

        files: dict[str, str] = {"report_json": rpt.REPORT_JSON, "report_md": rpt.REPORT_MD, "plot": rpt.PLOT_PNG}
        for key, name in MODEL_FILES.items():
            (bn_model if key == "bn" else plain_model).save(staging / name)
            files[f"model_{key}"] = name
        onnx_files: dict[str, str] = {}
        for form, path in agreement["onnx_files"].items():
            rel = Path(ONNX_SUBDIR) / Path(path).name
            _install(Path(path), out / rel)
            onnx_files[form] = rel.as_posix()
        for name in MODEL_FILES.values():
            _install(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    per_epoch = {"bn": bn_hist, "no_bn": plain_hist}
    report = {
        "schema_version": rpt.SCHEMA_VERSION,
        "tool": "keras-bn run",
        "command": ["keras-bn", *sys.argv[1:]],
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {
            "name": dataset.name,
            "requested": args.dataset,
            "source": dataset.source,
            "embedded": dataset.embedded,
            "n_train": len(dataset.y_train),
            "n_test": len(dataset.y_test),
        },
        "config": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "model": args.model,
            "recipe": args.recipe.to_config(),
            "optimizer": args.recipe.recipe.optimizer,
            "sgd_momentum": args.recipe.recipe.sgd_momentum,
            "seed": args.seed,
            "limit": args.limit,
            "bn_layer": args.bn_layer,
            "convention": getattr(bn_model.get_layer("bn1"), "convention", "keras"),
            "bn_momentum": float(bn_model.get_layer("bn1").momentum),
            "epsilon": float(bn_model.get_layer("bn1").epsilon),
        },
        "accuracy": {"bn": bn_acc, "no_bn": plain_acc, "per_epoch": per_epoch},
        "runtimes": agreement["runtimes"],
        "agreement_images": agreement["n_inputs"],
        "tolerance": agreement["tolerance"],
        "agreement": agreement["pairs"],
        "agreement_passed": agreement["passed"],
        "onnx_files": onnx_files,
        "files": files,
        "versions": rpt.collect_versions(),
        "timings_s": timings,
    }
    t0 = time.perf_counter()
    rpt.write_plot(per_epoch, out / rpt.PLOT_PNG, f"{args.recipe.recipe.title} with vs without BN on {dataset.name}")
    timings["report"] = time.perf_counter() - t0
    rpt.write_json(report, out / rpt.REPORT_JSON)
    rpt.write_markdown(report, out / rpt.REPORT_MD)
    log(f"test accuracy: LeNet-BN {100 * bn_acc:.2f}%, LeNet without BN {100 * plain_acc:.2f}%")
    log(f"report: {out / rpt.REPORT_MD}, {out / rpt.REPORT_JSON}, {out / rpt.PLOT_PNG}")
    if not agreement["passed"]:
        print(f"keras-bn: {_failure_message(agreement['pairs'])}", file=sys.stderr)
        return EXIT_DISAGREE
    log(f"agreement: all {len(agreement['pairs'])} runtime pairs within tolerance, argmax 100%")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``keras-bn`` (also ``python -m export``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_main_job(args)
    except UsageError as exc:
        print(f"keras-bn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
