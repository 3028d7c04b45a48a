"""``keras-bn run``: the main job a new user runs first; ``keras-bn check MODEL.keras``: the same agreement check on
a user's own model (``export.check``); ``keras-bn verify``: check a run's files.

Train LeNet-BN and the same LeNet without BN with ``model.fit`` (same initial kernels, optimizer and batches), copy
the BN model's weights into PyTorch, export both frameworks to ONNX (BN kept and folded), compare the logits of every
runtime on the test images, and write a report.

Exit status (also in ``--help`` and docs/report.md): a crash never looks like a result.

- 0: every runtime pair agrees (``verify``: the set matches its manifest).
- 1: a runtime pair disagrees; the message names the pair and the worst input (``verify``: a file is missing,
  changed or extra).
- 2: bad input, found before any training: arguments, data directory or files, an ``--out`` that is not a
  directory, not writable, holds the user's files (without ``--force``) or is in use by another run, and a missing
  optional dependency (the message names the extra to install); ``check``: a missing or non-Keras MODEL, a layer the
  converter does not support (named with its type), images of the wrong shape or dtype.
- 3: the run failed: training diverged (non-finite loss; the report is written and says so) or an internal error
  (one line naming it; ``--debug`` prints the traceback).
- 130: interrupted (Ctrl-C); nothing of the interrupted run is published.

Output directory: the policy is docs/report.md's "Output directory" section, implemented by ``export.outdir``;
this module only opens, publishes and closes it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from export import outdir, pipeline, recipes
from export import report as rpt
from export.errors import UsageError
from mnist_data import DATASET_NAMES

__all__ = ["EXIT_CODES", "OPTIONAL_MODULES", "build_parser", "check_main", "main", "run_main_job"]

EXIT_OK, EXIT_DISAGREE, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "every runtime pair agrees",
    EXIT_DISAGREE: "a runtime pair disagrees",
    EXIT_USAGE: "bad input or a missing optional dependency (nothing was run)",
    EXIT_FAILED: "the run failed (training diverged, or an internal error)",
    EXIT_INTERRUPTED: "interrupted",
}
MODEL_FILES = pipeline.MODEL_FILES
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
#: What ``check`` imports beyond Keras (no training data, no plot).
CHECK_MODULES = ["torch", "onnx", "onnxruntime", "tf2onnx", "onnxscript"]
# Epochs, batch size and --limit beyond int32 overflow TensorFlow's shapes and counters (and exceed any real run).
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which keras.utils.set_random_seed calls, takes [0, 2**32 - 1]


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


#: --help's one-paragraph summary of the output-directory policy (the policy itself: docs/report.md).
OUTPUT_HELP = (
    "Output: the files appear together as --out/latest (swapped in one atomic rename) or not at all; report.json "
    "lists each file's size and sha256 (keras-bn verify DIR checks them); a second run on the same --out is refused "
    "while one runs; an --out holding other files is refused unless --force, and those files are never touched "
    "(the whole policy: docs/report.md, 'Output directory')."
)
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
    _add_run_command(sub, common)
    _add_verify_command(sub, common)
    _add_check_command(sub, common)
    return parser


def _add_run_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
            + OUTPUT_HELP
            + " "
            + _EXIT_EPILOG
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


def _add_check_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    check = sub.add_parser(
        "check",
        parents=[common],
        help="convert your own .keras model to PyTorch and ONNX, check that every runtime agrees, write a report",
        description=(
            "Load MODEL (a .keras file with one channels-last image input and one output), convert it to PyTorch "
            "(torch_ref.from_keras: each BN layer keeps its epsilon, momentum and convention) and to ONNX (BN kept "
            "and folded), compare the logits of every runtime on the images, and write report.md, report.json and "
            "the ONNX files to --out/latest. A runtime pair agrees when max|Δ| <= 1e-5·max(1, max|logit|) and "
            "argmax agrees on every image."
        ),
        epilog=(
            "Without --images: 32 deterministic float32 images, uniform in [0, 1) (numpy default_rng(0)), shaped "
            "like the model's input; the report says so. Bad input exits 2 naming it: a missing file, a file that "
            "is not a Keras model, a layer the converter does not support (named with its type), images of the "
            "wrong shape or dtype. " + OUTPUT_HELP + " " + _EXIT_EPILOG
        ),
    )
    check.add_argument("model", type=Path, metavar="MODEL", help="a Keras model saved with model.save('x.keras')")
    check.add_argument(
        "--images",
        type=Path,
        metavar="DIR|FILE.npz",
        help="a folder of image files (PNG, JPEG, ...: converted to the model's 1 or 3 channels, pixels / 255, "
        "resized bilinear to its H x W), or float32 images (N, H, W, C) under the key 'images' "
        "(np.savez(FILE, images=x)); default: 32 deterministic uniform [0, 1) images",
    )
    check.add_argument(
        "--out",
        type=Path,
        default=Path("keras-bn-check-out"),
        help="output directory; the files appear in OUT/latest (default: ./keras-bn-check-out)",
    )
    check.add_argument("--force", action="store_true", help="use an --out that holds other files (never touched)")
    check.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="RUNTIME",
        help="an optional runtime not to run (keras:jax, litert, openvino:FORM); repeatable",
    )
    check.add_argument("--quiet", action="store_true", help="no step messages")


def _add_verify_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check that a run's files match the sizes and sha256 listed in its report.json",
        description="Exit 0 when every file listed in DIR's report.json manifest is present with its size and "
        "sha256 and no other file is in the set; 1 otherwise (each problem on its own line); 2 if DIR is not a "
        "directory.",
    )
    verify.add_argument("dir", type=Path, metavar="DIR", help="a run's --out (its latest set is checked) or a set")


class Log:
    """Step messages on stdout, ``[keras-bn] ...``; silent with ``--quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[keras-bn] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- checks before work


def _missing_extras(modules: list[str]) -> list[tuple[str, str]]:
    """(module, extra) for every module of ``modules`` (keys of OPTIONAL_MODULES) that cannot be found."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install: as good as missing
            found = False
        if not found:
            missing.append((module, OPTIONAL_MODULES[module]))
    return missing


def _require_extras(command: str, modules: list[str]) -> None:
    missing = _missing_extras(modules)
    if missing:
        extras = ",".join(sorted({extra for _, extra in missing}))
        raise UsageError(
            f"keras-bn {command} needs {', '.join(m for m, _ in missing)}, not installed; "
            f"install the extras: pip install 'keras-bn[{extras}]' (or 'keras-bn[all]')"
        )


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
    _require_extras("run", [m for m in OPTIONAL_MODULES if m != "sklearn" or args.dataset == "digits"])
    try:
        outdir.check_out_dir(args.out, force=args.force)
    except outdir.OutputDirError as exc:
        raise UsageError(str(exc)) from None


def _config(args: argparse.Namespace) -> pipeline.MainJobConfig:
    """``--model``'s recipe supplies every training flag the user left out (export/recipes.py)."""
    recipe = recipes.resolve(
        args.model, dataset=args.dataset, data_dir=args.data_dir, download=args.download, lr=args.lr,
        batch_size=args.batch_size, epochs=args.epochs,
    )  # fmt: skip
    args.dataset = recipe.dataset  # _check_arguments judges the dataset that will load
    return pipeline.MainJobConfig(
        command=["keras-bn", *args.argv], model=args.model, recipe=recipe, dataset=recipe.dataset,
        data_dir=args.data_dir, download=args.download, epochs=recipe.epochs, batch_size=recipe.batch_size,
        lr=recipe.lr, seed=args.seed, limit=args.limit, bn_layer=args.bn_layer, quiet=args.quiet,
    )  # fmt: skip


def open_out(out: Path, log: Log) -> outdir.OutputDir:
    """Create, lock and stage ``out`` (the policy: export.outdir's docstring); a refusal is a UsageError."""
    try:
        held = outdir.OutputDir(out).open()
    except outdir.OutputDirError as exc:
        raise UsageError(str(exc)) from None
    if held.cleaned:
        log(f"removed what an interrupted earlier run left in {out}: {', '.join(held.cleaned)}")
    return held


def run_main_job(args: argparse.Namespace) -> int:
    """The ``run`` command; returns the exit status (raises UsageError for bad input)."""
    started = time.perf_counter()
    log = Log(args.quiet)
    config = _config(args)
    _check_arguments(args)  # arguments, extras and --out, before any work
    dataset, load_seconds = pipeline.load_data(config, log)
    out = open_out(args.out, log)  # before training: fails fast
    try:
        result = pipeline.run_main_job(config, dataset, out.staging, log, load_seconds=load_seconds)
        t0 = time.perf_counter()
        title = f"{config.recipe.recipe.title} with vs without BN on {dataset.name}"
        rpt.write_plot(result.per_epoch, out.staging / rpt.PLOT_PNG, title)
        files = {**result.files, "plot": rpt.PLOT_PNG, "report_md": rpt.REPORT_MD, "report_json": rpt.REPORT_JSON}
        report = rpt.main_job_report(config, result, files=files)
        result.timings["report"] = time.perf_counter() - t0
        rpt.write_set(report, out.staging, started=started)
        current = out.publish()
    finally:
        out.close()
    log(f"report: {current / rpt.REPORT_MD}, {current / rpt.REPORT_JSON}, {current / rpt.PLOT_PNG}")
    return _main_job_exit(result, current, log)


def _main_job_exit(result: pipeline.MainJobResult, current: Path, log: Log) -> int:
    if result.failure is not None:
        print(f"keras-bn: error: {result.failure}; report: {current / rpt.REPORT_MD}", file=sys.stderr)
        return EXIT_FAILED
    accuracy = {key: 100 * t.test_accuracy for key, t in result.trained.items()}
    log(f"test accuracy: LeNet-BN {accuracy['bn']:.2f}%, LeNet without BN {accuracy['no_bn']:.2f}%")
    if not result.agreement["passed"]:
        print(f"keras-bn: {rpt.disagreement_message(result.agreement['pairs'])}", file=sys.stderr)
        return EXIT_DISAGREE
    log(f"agreement: all {len(result.agreement['pairs'])} runtime pairs within tolerance, argmax 100%")
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


def check_main(args: argparse.Namespace) -> int:
    """The ``check`` command: 0 when every runtime pair agrees on the user's model, 1 naming the worst pair."""
    _require_extras("check", CHECK_MODULES)
    from export import check

    log = Log(args.quiet)
    result = check.check_model(
        args.model, images=args.images, out=args.out, force=args.force, skip=args.skip, log=log,
        command=["keras-bn", *args.argv],
    )  # fmt: skip
    report_md = result.out / rpt.REPORT_MD
    if not result.passed:
        message = rpt.disagreement_message(result.report["agreement"], inputs="image")
        print(f"keras-bn: {message}; report: {report_md}", file=sys.stderr)
        return EXIT_DISAGREE
    log(f"agreement: all {len(result.report['agreement'])} runtime pairs within tolerance, argmax 100%; {report_md}")
    return EXIT_OK


_COMMANDS = {"run": run_main_job, "verify": verify_main, "check": check_main}


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
