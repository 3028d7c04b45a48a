"""The main job's work, in order: load data, train (with and without BN), transfer to PyTorch, export, agree.

:func:`run_main_job` does it inside a staging folder it is given and returns a :class:`MainJobResult`; the report
(``export.report``) is built from that result and the CLI (``export.cli``) only parses arguments, holds the output
directory and turns the result into an exit status. Nothing here prints except through the ``log`` callable.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export import recipes
from export.errors import UsageError
from mnist_data import Dataset, load_dataset, to_nhwc_float

__all__ = ["MODEL_FILES", "ONNX_SUBDIR", "MainJobConfig", "MainJobResult", "Trained", "load_data", "run_main_job"]

ONNX_SUBDIR = "onnx"
MODEL_FILES = {"bn": "lenet_bn.keras", "no_bn": "lenet.keras"}
EMPTY_HISTORY: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}

Log = Callable[[str], None]


@dataclass(frozen=True)
class MainJobConfig:
    """What ``keras-bn run`` was asked to do, with the recipe's defaults filled in (``export.recipes.resolve``)."""

    command: list[str]  # as typed, for the report
    model: str
    recipe: recipes.Resolved
    dataset: str  # the requested dataset after the recipe (digits, mnist, fashion)
    data_dir: Path | None
    download: bool
    epochs: int
    batch_size: int
    lr: float
    seed: int
    limit: int | None
    bn_layer: str  # "ours" | "keras"
    quiet: bool


@dataclass
class Trained:
    model: Any
    per_epoch: dict[str, list[float]]
    test_accuracy: float | None  # None when training diverged (nothing meaningful to evaluate)
    diverged: dict[str, Any] | None  # {"epoch", "batch", "loss"} of the first non-finite training loss


@dataclass
class MainJobResult:
    """Everything the report needs: the data, both trained models, the agreement and the files written."""

    dataset: Dataset
    trained: dict[str, Trained] = field(default_factory=dict)
    #: export.agreement's result reduced to what the report keeps (see :func:`_agreement`); None if not run
    agreement: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to the staging folder
    onnx_files: dict[str, str] = field(default_factory=dict)  # form -> path relative to the staging folder
    timings: dict[str, float] = field(default_factory=dict)
    failure: str | None = None  # why the job stopped early (training diverged)

    @property
    def per_epoch(self) -> dict[str, dict[str, list[float]]]:
        return {key: self.trained[key].per_epoch if key in self.trained else EMPTY_HISTORY for key in MODEL_FILES}

    @property
    def status(self) -> str:
        """report.json's ``status``: passed, disagreed or diverged (docs/report.md)."""
        if self.failure is not None:
            return "diverged"
        return "passed" if self.agreement is not None and self.agreement["passed"] else "disagreed"


def load_data(config: MainJobConfig, log: Log) -> tuple[Dataset, float]:
    """The dataset, limited to ``config.limit``, and the seconds it took; a user's mistake is a UsageError."""
    t0 = time.perf_counter()
    try:
        dataset = load_dataset(config.dataset, config.data_dir, download=config.download)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:
        raise UsageError(f"cannot load {config.dataset}: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot get {config.dataset}: {exc}") from exc
    if config.recipe.dataset_note:  # a default, not an error: on stdout like the other steps (report.json keeps it)
        log(f"note: {config.recipe.dataset_note}")
    dataset = dataset.limit(config.limit)
    log(f"data: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test; {dataset.source}")
    return dataset, time.perf_counter() - t0


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


def _train(dataset: Dataset, batch_norm: str | None, config: MainJobConfig, log: Log) -> Trained:
    """Build, fit and evaluate one LeNet, stopping at the first non-finite loss."""
    import keras

    # Same global seed before each model: same shuffling order and same dropout-free init for both.
    keras.utils.set_random_seed(config.seed)
    model = config.recipe.recipe.build_keras(batch_norm, seed=config.seed, lr=config.lr)
    x_train, x_test = to_nhwc_float(dataset.x_train), to_nhwc_float(dataset.x_test)
    guard = _divergence_guard()
    history = model.fit(
        x_train,
        dataset.y_train,
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=(x_test, dataset.y_test),
        callbacks=[guard],
        verbose=0 if config.quiet else 1,
    )
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    per_epoch = {k: [float(v) for v in history.history.get(k, [])] for k in keys}
    if guard.at is not None:
        return Trained(model, per_epoch, None, guard.at)
    _, test_accuracy = model.evaluate(x_test, dataset.y_test, batch_size=256, verbose=0)
    log(f"{model.name}: test accuracy {100 * test_accuracy:.2f}%")
    return Trained(model, per_epoch, float(test_accuracy), None)


def _to_torch(keras_model: Any) -> Any:
    """The PyTorch twin (our autograd BN) holding exactly the Keras model's weights and moving statistics."""
    import torch_ref

    torch_model = recipes.for_keras_model(keras_model).build_torch()
    torch_ref.keras_to_torch(keras_model, torch_model)
    return torch_model.eval()


def agreement_summary(result: Any) -> dict[str, Any]:
    """Of an ``export.agreement.AgreementResult``, what a report keeps (``run`` and ``check`` alike)."""
    return {
        "runtimes": list(result.runtimes),
        "pairs": result.to_json(),  # a, b, max_abs, max_rel, argmax_agreement, max_abs_logit, worst_index, ...
        "onnx_files": {str(form): Path(path) for form, path in result.onnx_files.items()},
        "passed": bool(result.passed),
        "n_inputs": int(result.n_inputs),
        # export.agreement.RTOL (SPEC.md §8.4's float32 bound): max|a - b| <= rtol * max(1, max|logit|), argmax 100%.
        "tolerance": {"rel_to_max_logit": float(result.rtol), "argmax_agreement": 1.0},
        # skipped runtimes (deploy extra missing), runtime versions, LiteRT BN form: reported as they come
        "summary": result.summary(),
    }


def _agreement(keras_model: Any, torch_model: Any, dataset: Dataset, onnx_dir: Path) -> dict[str, Any]:
    """Run export.agreement.compare_runtimes (exports into ``onnx_dir``) and keep what the report needs."""
    from export.agreement import compare_runtimes

    return agreement_summary(
        compare_runtimes(keras_model, torch_model, to_nhwc_float(dataset.x_test), out_dir=onnx_dir)
    )


def quiet_torch_onnx_logger() -> None:
    """torch.onnx's exporter warns once per missing torchvision op (nothing here uses torchvision); call it after
    importing torch, whose logging setup resets this logger's level."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _divergence_message(label: str, at: dict[str, Any], lr: float) -> str:
    return (
        f"training diverged: {label}'s loss became {at['loss']} at epoch {at['epoch']}, batch {at['batch']} "
        f"(SGD lr {lr}); stopped there, no export or agreement check was run"
    )


def run_main_job(
    config: MainJobConfig, dataset: Dataset, stage: Path, log: Log, *, load_seconds: float = 0.0
) -> MainJobResult:
    """Train both LeNets, save them, transfer LeNet-BN to PyTorch, export and compare: every file into ``stage``.

    ``load_seconds`` (from :func:`load_data`) opens the timings, so the report lists the steps in order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = MainJobResult(dataset, timings={"load_data": load_seconds})
    for key, batch_norm, label in (("bn", config.bn_layer, "LeNet-BN"), ("no_bn", None, "LeNet without BN")):
        t0 = time.perf_counter()
        log(
            f"training {label}" + (f" ({config.bn_layer} BN layer)" if batch_norm else "") + f", {config.epochs} epochs"
        )
        trained = result.trained[key] = _train(dataset, batch_norm, config, log)
        result.timings[f"train_{key}"] = time.perf_counter() - t0
        if trained.diverged is not None:
            result.failure = _divergence_message(label, trained.diverged, config.lr)
            return result
        trained.model.save(stage / MODEL_FILES[key])
        result.files[f"model_{key}"] = MODEL_FILES[key]

    t0 = time.perf_counter()
    log("transferring LeNet-BN to PyTorch, exporting ONNX, comparing runtimes")
    torch_model = _to_torch(result.trained["bn"].model)
    quiet_torch_onnx_logger()
    result.agreement = _agreement(result.trained["bn"].model, torch_model, dataset, stage / ONNX_SUBDIR)
    result.onnx_files = {
        form: Path(path).relative_to(stage).as_posix() for form, path in result.agreement["onnx_files"].items()
    }
    result.timings["export_and_agreement"] = time.perf_counter() - t0
    return result
