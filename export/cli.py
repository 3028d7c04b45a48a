"""``keras-bn run``: the main job a new user runs first; ``keras-bn verify``: check a run's files.

Train LeNet-BN and the same LeNet without BN with ``model.fit`` (same initial kernels, optimizer and batches), copy
the BN model's weights into PyTorch, export both frameworks to ONNX (BN kept and folded), compare the logits of every
runtime on the test images, and write a report.

Exit status (also in ``--help`` and docs/report.md): a crash never looks like a result.

- 0: every runtime pair agrees (``verify``: the set matches its manifest).
- 1: a runtime pair disagrees; the message names the pair and the worst input (``verify``: a file is missing,
  changed or extra).
- 2: bad input, found before any training: arguments, data directory or files, an ``--out`` that is not a
  directory, not writable, holds the user's files (without ``--force``) or is in use by another run, and a missing
  optional dependency (the message names the extra to install).
- 3: the run failed: training diverged (non-finite loss; the report is written and says so) or an internal error
  (one line naming it; ``--debug`` prints the traceback).
- 130: interrupted (Ctrl-C); nothing of the interrupted run is published.

Output directory (export.outdir): every file is staged and the whole set becomes ``--out/latest`` in one atomic
rename, so ``--out`` holds the previous complete set or the new one, never a mixture; the user's files there are
never touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import outdir, recipes
from export import report as rpt
from export.machine import machine_info
from mnist_data import DATASET_NAMES, Dataset, load_dataset, to_nhwc_float

__all__ = ["EXIT_CODES", "OPTIONAL_MODULES", "build_parser", "main", "run_main_job"]

EXIT_OK, EXIT_DISAGREE, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "every runtime pair agrees",
    EXIT_DISAGREE: "a runtime pair disagrees",
    EXIT_USAGE: "bad input or a missing optional dependency (nothing was run)",
    EXIT_FAILED: "the run failed (training diverged, or an internal error)",
    EXIT_INTERRUPTED: "interrupted",
}
ONNX_SUBDIR = "onnx"
MODEL_FILES = {"bn": "lenet_bn.keras", "no_bn": "lenet.keras"}
#: Modules of the optional extras that ``run`` imports (module -> extra); checked before any work.
OPTIONAL_MODULES = {
    "torch": "torch",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "tf2onnx": "onnx",
    "onnxscript": "onnx",
    "matplotlib": "data",
    "sklearn": "data",  # scikit-learn: only for the embedded default dataset
}
# Epochs, batch size and --limit beyond int32 overflow TensorFlow's shapes and counters (and exceed any real run).
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which keras.utils.set_random_seed calls, takes [0, 2**32 - 1]


class UsageError(Exception):
    """Bad input from the user: printed as ``keras-bn: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a positive integer <= 2**31 - 1 = {MAX_COUNT}, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1 = {MAX_SEED}], got {value}")
    return value


_EXIT_EPILOG = "Exit status: " + "; ".join(f"{code}: {what}" for code, what in EXIT_CODES.items()) + "."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-bn",
        description="Batch Normalization that behaves identically in Keras/TensorFlow, PyTorch and ONNX Runtime.",
        epilog=_EXIT_EPILOG,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="on an internal error, print the Python traceback (default: one line)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        parents=[common],
        help="train LeNet with and without BN, export to ONNX, check agreement across runtimes, write a report",
        description=(
            "Train LeNet-BN and plain LeNet with model.fit, transfer the BN model to PyTorch, export both frameworks "
            "to ONNX (BN kept as BatchNormalization nodes and folded into Conv/Gemm), compare the logits of every "
            "runtime on the test images, and write report.md, report.json, curves.png, the ONNX files and the "
            "trained Keras models to --out/latest. A runtime pair agrees when max|Δ| <= 1e-5·max(1, max|logit|) "
            "and argmax agrees on every image."
        ),
        epilog=(
            "Without --data-dir the data is the embedded default: scikit-learn's bundled 8x8 handwritten digits "
            "(1,797 images) upscaled to 28x28, first 1,437 for training and last 360 for testing; it works offline. "
            "For MNIST: --dataset mnist --data-dir DIR with the four IDX files (raw or .gz) or Keras' mnist.npz, "
            "or --download to fetch them (md5-checked) into DIR or ~/.cache/keras-bn. "
            "Output: the run's files are staged and appear together as --out/latest (a symlink to a hidden "
            "versioned folder, swapped in one atomic rename), or not at all; report.json lists each file's size "
            "and sha256 (keras-bn verify DIR checks them). A second run on the same --out is refused while one "
            "runs. --out may be new, empty or a previous run's; one holding other files is refused unless --force, "
            "and those files are never touched. " + _EXIT_EPILOG
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
        help="learning rate of the recipe's optimizer, same for both models; finite and > 0 (default: the recipe's)",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path("keras-bn-out"),
        help="output directory; the run's files appear in OUT/latest (default: ./keras-bn-out)",
    )
    run.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="in [0, 2**32 - 1]; seeds Python, NumPy, TensorFlow and the kernel initializers; both models start "
        "alike (default: 0)",
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
        help="use an --out that holds other files (keras-bn adds its own names beside them and never touches them)",
    )
    run.add_argument("--quiet", action="store_true", help="no Keras progress bar and no step messages")
    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check that a run's files match the sizes and sha256 listed in its report.json",
        description="Exit 0 when every file listed in DIR's report.json manifest is present with its size and "
        "sha256 and no other file is in the set; 1 otherwise (each problem on its own line); 2 if DIR is not a "
        "directory.",
    )
    verify.add_argument("dir", type=Path, metavar="DIR", help="a run's --out (its latest set is checked) or a set")
    return parser


# ---------------------------------------------------------------------------------------------- checks before work


def _missing_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(module, extra) for every optional module this run would import and cannot find."""
    needed = [m for m in OPTIONAL_MODULES if m != "sklearn" or args.dataset == "digits"]
    missing = []
    for module in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install: as good as missing
            found = False
        if not found:
            missing.append((module, OPTIONAL_MODULES[module]))
    return missing


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything about the command line and the installation that can be refused before loading or training."""
    if args.dataset == "digits" and (args.data_dir is not None or args.download):
        raise UsageError("--dataset digits is the embedded default; it takes no --data-dir or --download")
    if args.dataset != "digits" and args.data_dir is None and not args.download:
        raise UsageError(
            f"--dataset {args.dataset} needs --data-dir DIR (the IDX files or Keras' .npz) or --download; "
            "for the embedded digits use --dataset digits"
        )
    if args.data_dir is not None and not args.download and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist or is not a directory")
    missing = _missing_extras(args)
    if missing:
        extras = ",".join(sorted({extra for _, extra in missing}))
        raise UsageError(
            f"keras-bn run needs {', '.join(m for m, _ in missing)}, not installed; "
            f"install the extras: pip install 'keras-bn[{extras}]' (or 'keras-bn[all]')"
        )
    try:
        outdir.check_out_dir(args.out, force=args.force)
    except outdir.OutputDirError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------------- the steps


class _Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[keras-bn] {message}", flush=True)


@dataclass
class _Trained:
    model: Any
    per_epoch: dict[str, list[float]]
    test_accuracy: float | None  # None when training diverged (nothing meaningful to evaluate)
    diverged: dict[str, Any] | None  # {"epoch", "batch", "loss"} of the first non-finite training loss


def _divergence_guard() -> Any:
    """A Keras callback that stops ``fit`` at the first non-finite training loss and records where it happened."""
    import keras

    class StopOnNonFiniteLoss(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.at: dict[str, Any] | None = None

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            loss = float((logs or {}).get("loss", 0.0))
            if not math.isfinite(loss) and self.at is None:
                # The loss as text ("nan", "inf"): strict JSON would turn either into null.
                self.at = {"epoch": self.epoch + 1, "batch": batch + 1, "loss": str(loss)}
                self.model.stop_training = True

    return StopOnNonFiniteLoss()


def _train(dataset: Dataset, batch_norm: str | None, args: argparse.Namespace, log: _Log) -> _Trained:
    """Build, fit and evaluate one LeNet, stopping at the first non-finite loss."""
    import keras

    # Same global seed before each model: same shuffling order and same dropout-free init for both.
    keras.utils.set_random_seed(args.seed)
    model = args.recipe.recipe.build_keras(batch_norm, seed=args.seed, lr=args.lr)
    x_train, x_test = to_nhwc_float(dataset.x_train), to_nhwc_float(dataset.x_test)
    guard = _divergence_guard()
    history = model.fit(
        x_train,
        dataset.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, dataset.y_test),
        callbacks=[guard],
        verbose=0 if args.quiet else 1,
    )
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    per_epoch = {k: [float(v) for v in history.history.get(k, [])] for k in keys}
    if guard.at is not None:
        return _Trained(model, per_epoch, None, guard.at)
    _, test_accuracy = model.evaluate(x_test, dataset.y_test, batch_size=256, verbose=0)
    log(f"{model.name}: test accuracy {100 * test_accuracy:.2f}%")
    return _Trained(model, per_epoch, float(test_accuracy), None)


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
        # skipped runtimes (deploy extra missing), runtime versions, LiteRT BN form: reported as they come
        "summary": result.summary(),
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


def _divergence_message(label: str, at: dict[str, Any], lr: float) -> str:
    return (
        f"training diverged: {label}'s loss became {at['loss']} at epoch {at['epoch']}, batch {at['batch']} "
        f"(SGD lr {lr}); stopped there, no export or agreement check was run"
    )


_EMPTY_HISTORY: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}


def _build_report(
    args: argparse.Namespace,
    dataset: Dataset,
    trained: dict[str, _Trained],
    per_epoch: dict[str, dict[str, list[float]]],
    agreement: dict[str, Any] | None,
    files: dict[str, str],
    onnx_files: dict[str, str],
    timings: dict[str, float],
    failure: str | None,
) -> dict[str, Any]:
    """The plain dict that report.json and report.md are rendered from (schema: docs/report.md)."""
    bn = trained["bn"].model
    if failure is not None:
        status = "diverged"
    else:
        status = "passed" if agreement is not None and agreement["passed"] else "disagreed"
    return {
        "schema_version": rpt.SCHEMA_VERSION,
        "tool": "keras-bn run",
        "status": status,
        "failure": failure,
        "command": ["keras-bn", *args.argv],
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "dataset": {
            "name": dataset.name,
            "requested": args.dataset,
            "source": dataset.source,
            "embedded": dataset.embedded,
            "canonical": dataset.canonical,
            "file_md5": dict(dataset.file_md5),
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
            "convention": getattr(bn.get_layer("bn1"), "convention", "keras"),
            "bn_momentum": float(bn.get_layer("bn1").momentum),
            "epsilon": float(bn.get_layer("bn1").epsilon),
        },
        "accuracy": {
            "bn": trained["bn"].test_accuracy,
            "no_bn": trained["no_bn"].test_accuracy if "no_bn" in trained else None,
            "per_epoch": per_epoch,
            "diverged": {key: t.diverged for key, t in trained.items() if t.diverged is not None},
        },
        "runtimes": agreement["runtimes"] if agreement else [],
        "agreement_images": agreement["n_inputs"] if agreement else 0,
        "tolerance": agreement["tolerance"] if agreement else {},
        "agreement": agreement["pairs"] if agreement else [],
        "agreement_passed": bool(agreement and agreement["passed"]),
        "skipped_runtimes": agreement["summary"]["skipped"] if agreement else [],
        "runtime_versions": agreement["summary"]["runtime_versions"] if agreement else {},
        "litert": agreement["summary"]["litert"] if agreement else {},
        "onnx_files": onnx_files,
        "files": files,
        "versions": rpt.collect_versions(),
        "timings_s": timings,
    }


def run_main_job(args: argparse.Namespace) -> int:
    """The ``run`` command; returns the exit status (raises UsageError for bad input)."""
    started = time.perf_counter()
    log = _Log(args.quiet)
    # --model: the recipe supplies every training flag the user left out (export/recipes.py).
    args.recipe = recipes.resolve(
        args.model, dataset=args.dataset, data_dir=args.data_dir, download=args.download, lr=args.lr,
        batch_size=args.batch_size, epochs=args.epochs,
    )  # fmt: skip
    args.dataset, args.lr, args.batch_size, args.epochs = (
        args.recipe.dataset, args.recipe.lr, args.recipe.batch_size, args.recipe.epochs,
    )  # fmt: skip
    _check_arguments(args)  # arguments, extras and --out, before any work
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
    if args.recipe.dataset_note:  # a default, not an error: on stdout like the other steps (report.json keeps it)
        log(f"note: {args.recipe.dataset_note}")
    dataset = dataset.limit(args.limit)
    timings["load_data"] = time.perf_counter() - t0
    log(f"data: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test; {dataset.source}")

    try:
        out = outdir.OutputDir(args.out).open()  # creates, locks and stages before training: fails fast
    except outdir.OutputDirError as exc:
        raise UsageError(str(exc)) from None
    try:
        if out.cleaned:
            log(f"removed what an interrupted earlier run left in {args.out}: {', '.join(out.cleaned)}")
        return _run_in(out, dataset, args, log, timings, started)
    finally:
        out.close()


def _run_in(
    out: outdir.OutputDir,
    dataset: Dataset,
    args: argparse.Namespace,
    log: _Log,
    timings: dict[str, float],
    started: float,
) -> int:
    """Train, export and compare with every file written into ``out.staging``; publish the set at the end."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stage = out.staging
    files: dict[str, str] = {}
    trained: dict[str, _Trained] = {}
    failure = None
    for key, batch_norm, label in (("bn", args.bn_layer, "LeNet-BN"), ("no_bn", None, "LeNet without BN")):
        t0 = time.perf_counter()
        log(f"training {label}" + (f" ({args.bn_layer} BN layer)" if batch_norm else "") + f", {args.epochs} epochs")
        trained[key] = _train(dataset, batch_norm, args, log)
        timings[f"train_{key}"] = time.perf_counter() - t0
        if trained[key].diverged is not None:
            failure = _divergence_message(label, trained[key].diverged, args.lr)
            break
        trained[key].model.save(stage / MODEL_FILES[key])
        files[f"model_{key}"] = MODEL_FILES[key]

    agreement, onnx_files = None, {}
    if failure is None:
        t0 = time.perf_counter()
        log("transferring LeNet-BN to PyTorch, exporting ONNX, comparing runtimes")
        torch_model = _to_torch(trained["bn"].model)
        # torch.onnx's exporter warns once per missing torchvision op (nothing here uses torchvision); set after
        # importing torch, whose logging setup resets this logger's level.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        agreement = _agreement(trained["bn"].model, torch_model, dataset, stage / ONNX_SUBDIR)
        onnx_files = {form: Path(path).relative_to(stage).as_posix() for form, path in agreement["onnx_files"].items()}
        timings["export_and_agreement"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_epoch = {key: trained[key].per_epoch if key in trained else _EMPTY_HISTORY for key in MODEL_FILES}
    title = f"{args.recipe.recipe.title} with vs without BN on {dataset.name}"
    rpt.write_plot(per_epoch, stage / rpt.PLOT_PNG, title)
    files.update({"plot": rpt.PLOT_PNG, "report_md": rpt.REPORT_MD, "report_json": rpt.REPORT_JSON})
    report = _build_report(args, dataset, trained, per_epoch, agreement, files, onnx_files, timings, failure)
    timings["report"] = time.perf_counter() - t0
    report["wall_time_s"] = time.perf_counter() - started
    rpt.write_markdown(report, stage / rpt.REPORT_MD)
    report["manifest"] = outdir.manifest(stage, exclude=frozenset({rpt.REPORT_JSON, outdir.STAGING_MARKER}))
    rpt.write_json(report, stage / rpt.REPORT_JSON)
    current = out.publish()

    log(f"report: {current / rpt.REPORT_MD}, {current / rpt.REPORT_JSON}, {current / rpt.PLOT_PNG}")
    if failure is not None:
        print(f"keras-bn: error: {failure}; report: {current / rpt.REPORT_MD}", file=sys.stderr)
        return EXIT_FAILED
    accuracy = {key: 100 * t.test_accuracy for key, t in trained.items()}
    log(f"test accuracy: LeNet-BN {accuracy['bn']:.2f}%, LeNet without BN {accuracy['no_bn']:.2f}%")
    if not agreement["passed"]:
        print(f"keras-bn: {_failure_message(agreement['pairs'])}", file=sys.stderr)
        return EXIT_DISAGREE
    log(f"agreement: all {len(agreement['pairs'])} runtime pairs within tolerance, argmax 100%")
    return EXIT_OK


def verify_main(args: argparse.Namespace) -> int:
    """The ``verify`` command: 0 when the set matches its manifest, 1 with each problem on its own line."""
    if not args.dir.is_dir():
        raise UsageError(f"{args.dir} is not a directory")
    problems = outdir.verify(args.dir)
    for problem in problems:
        print(f"keras-bn verify: {problem}", file=sys.stderr)
    if problems:
        return EXIT_DISAGREE
    print(f"keras-bn verify: {args.dir}: every file matches its size and sha256 in report.json")
    return EXIT_OK


_COMMANDS = {"run": run_main_job, "verify": verify_main}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``keras-bn`` (also ``python -m export``); exit codes in the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"keras-bn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("keras-bn: interrupted; nothing of this run was published, --out is as it was", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        print(f"keras-bn: error: the run failed: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
