"""``keras-bn check MODEL.keras`` and :func:`check_model`: do a user's own Keras model, its PyTorch conversion and
their ONNX exports compute the same logits?

The model is converted by ``torch_ref.from_keras`` (every BN layer with its own epsilon, momentum and
running-variance convention), both are exported to ONNX with BN kept and BN folded (``export.onnx.exporters``, as
``keras-bn run`` does), and ``export.agreement.compare_runtimes`` compares every runtime pair on the images.

Images: ``--images FILE.npz`` holding an array under the key :data:`IMAGES_KEY`, float32, shaped
``(N, H, W, C)`` like the model's input; or ``--images DIR``, a folder of image files (:func:`load_image_dir`:
grayscale or RGB, pixels / 255, resized to the model's size); without it, :data:`DEFAULT_IMAGES` deterministic
uniform [0, 1) images (NumPy ``default_rng(0)``), which the report says. Supported models: one channels-last image input
``(None, H, W, C)`` and one output; an unsupported layer is refused by the converter, naming the layer and its type.
The NumPy float64 ``spec`` forward runs when it knows every layer (LeNet-style chains); otherwise the report lists
it as skipped, with the reason.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import outdir
from export import report as rpt
from export.errors import UsageError

__all__ = [
    "DEFAULT_IMAGES",
    "IMAGES_KEY",
    "IMAGE_SUFFIXES",
    "CheckResult",
    "check_model",
    "load_image_dir",
    "load_images",
    "load_keras_model",
]

#: the key of the image array in ``--images FILE.npz``
IMAGES_KEY = "images"
#: how many deterministic images stand in when none are given
DEFAULT_IMAGES = 32
ONNX_SUBDIR = "onnx"


@dataclass
class CheckResult:
    """What :func:`check_model` found: ``passed``, the agreement, the report dict and where the set is (if kept)."""

    report: dict[str, Any]
    agreement: Any  # export.agreement.AgreementResult
    out: Path | None = None  # ``out/latest`` when ``out`` was given
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.agreement.passed)

    @property
    def status(self) -> str:
        return "passed" if self.passed else "disagreed"


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """``keras.saving.load_model`` of a ``.keras`` file, with ``keras_bn`` registered; a bad file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a Keras model file (.keras, a zip archive saved by model.save)")
    import keras

    import keras_bn  # noqa: F401  (registers keras_bn>BatchNorm so that load_model can rebuild it)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, TypeError, KeyError ... for a foreign or damaged archive
        raise UsageError(f"{path} is not a loadable Keras model: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _image_shape(model: Any) -> tuple[int, int, int]:
    """(H, W, C) of the model's one channels-last image input; anything else is a UsageError naming it."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "keras-bn check takes one image input and one output"
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise UsageError(f"model {model.name!r} input shape {shape} is not (None, H, W, C) with fixed H, W, C")
    return shape[1], shape[2], shape[3]


#: image files ``--images DIR`` reads (Pillow decodes them)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_dir(directory: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """Every image file in ``directory`` (sorted by name, not recursive) as float32 ``(N, H, W, C)`` in [0, 1].

    Pixels are divided by 255 after conversion to grayscale (C = 1) or RGB (C = 3) and a bilinear resize to the
    model's H x W where the size differs. This is not the model's own preprocessing: the check compares runtimes
    on the same inputs, and says in the report how they were made. A file Pillow cannot decode is a UsageError
    naming it; so is a folder without image files.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError("--images DIR needs Pillow: pip install 'keras-bn[data]'") from exc
    h, w, c = shape
    if c not in (1, 3):
        raise UsageError(f"--images {directory}: image files give 1 or 3 channels, the model takes {c}; use a .npz")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {directory} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    images, resized = [], 0
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if c == 1 else "RGB")
                if image.size != (w, h):
                    image, resized = image.resize((w, h), Image.Resampling.BILINEAR), resized + 1
                pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UsageError(f"--images {directory}: cannot read {file.name}: {_first_line(exc)}") from exc
        images.append(pixels.reshape(h, w, c))
    mode = "grayscale" if c == 1 else "RGB"
    described = (
        f"{len(files)} image files from {directory} ({mode}, pixels / 255, {resized} resized bilinear to {h}x{w})"
    )
    return np.stack(images), described


def load_images(path: str | os.PathLike[str], shape: tuple[int, int, int]) -> np.ndarray:
    """The float32 ``(N, H, W, C)`` array stored under :data:`IMAGES_KEY` in ``path`` (.npz), checked against
    ``shape`` (the model's H, W, C); anything else is a UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--images {path} does not exist or is not a file or a folder of images")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--images {path} is not a readable .npz file: {_first_line(exc)}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UsageError(f"--images {path} is a bare .npy array; save it with np.savez(FILE, {IMAGES_KEY}=array)")
    with archive:
        if IMAGES_KEY not in archive.files:
            raise UsageError(f"--images {path}: no array {IMAGES_KEY!r} in it (found {archive.files})")
        try:
            images = archive[IMAGES_KEY]
        except ValueError as exc:  # an object array, which would need pickle
            raise UsageError(f"--images {path}: {IMAGES_KEY!r} is not a plain array: {_first_line(exc)}") from exc
    if images.dtype != np.float32 or images.ndim != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
        raise UsageError(
            f"--images {path}: {IMAGES_KEY!r} is {images.dtype} {images.shape}; the model needs {_wanted(shape)}"
        )
    return images


def _wanted(shape: tuple[int, int, int]) -> str:
    return f"float32 (N, {', '.join(map(str, shape))}) with N >= 1"


def default_images(shape: tuple[int, int, int], n: int = DEFAULT_IMAGES) -> np.ndarray:
    """``n`` deterministic float32 images, uniform in [0, 1) from ``numpy.random.default_rng(0)``."""
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def _to_torch(keras_model: Any) -> Any:
    """The PyTorch twin from ``torch_ref.from_keras`` (NCHW in, as export and runtimes expect), in eval mode."""
    import torch

    import torch_ref

    try:
        converted = torch_ref.from_keras(keras_model, channels_last=False)
    except (ValueError, TypeError, NotImplementedError) as exc:  # names the layer and its type
        raise UsageError(f"cannot convert model {keras_model.name!r} to PyTorch: {_first_line(exc)}") from exc

    class ImagesToLogits(torch.nn.Module):
        """One named input: torch.export cannot give the converted module's ``*inputs`` a dynamic batch axis."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images)

    return ImagesToLogits(converted).eval()


def _spec_refusal(keras_model: Any, images: np.ndarray) -> str | None:
    """Why the NumPy ``spec`` forward cannot run this model (None if it can); it knows LeNet-style chains only."""
    from export.runtimes import run_spec

    try:
        run_spec(keras_model, images[:1])
    except ValueError as exc:
        return _first_line(exc)
    return None


def _bn_layers(keras_model: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": layer.name,
            "type": _registered_name(layer),
            "convention": getattr(layer, "convention", "keras"),
            "momentum": None if layer.momentum is None else float(layer.momentum),
            "epsilon": float(layer.epsilon),
        }
        for layer in _layers(keras_model)
        if hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance")
    ]


def _registered_name(layer: Any) -> str:
    """Keras' serialization name: ``BatchNormalization`` for Keras' layer, ``keras_bn>BatchNorm`` for ours (whose
    class is also called BatchNormalization, so that it is a drop-in)."""
    import keras

    return keras.saving.get_registered_name(type(layer))


def _layers(model: Any) -> list[Any]:
    """Every layer, nested models walked through (public ``Model.layers`` only)."""
    import keras

    found = []
    for layer in model.layers:
        found += _layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "model"


def _compare(
    context: _Context, onnx_dir: Path, skip: Collection[str], log: Callable[[str], None]
) -> tuple[Any, dict[str, float]]:
    """Export (into ``onnx_dir``) and compare; returns the AgreementResult and the step timings."""
    from export.agreement import compare_runtimes
    from export.onnx.exporters import export_all
    from export.pipeline import quiet_torch_onnx_logger

    keras_model, torch_model, images = context.keras_model, context.torch_model, context.images
    timings = {"convert": context.convert_seconds}
    quiet_torch_onnx_logger()
    log("exporting ONNX (BN kept and folded)")
    t0 = time.perf_counter()
    h, w, c = images.shape[1:]
    files = export_all(keras_model, torch_model, onnx_dir, input_shape=(c, h, w), stem=_stem(keras_model.name))
    timings["export"] = time.perf_counter() - t0
    log(f"comparing runtimes on {len(images)} images")
    t0 = time.perf_counter()
    result = compare_runtimes(
        keras_model, torch_model, images, onnx_files=files, skip=skip, without_spec=_spec_refusal(keras_model, images)
    )
    timings["agreement"] = time.perf_counter() - t0
    return result, timings


def check_model(
    model_or_path: Any,
    images: np.ndarray | str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    skip: Collection[str] = (),
    log: Callable[[str], None] | None = None,
    command: list[str] | None = None,
) -> CheckResult:
    """Convert a Keras model to PyTorch and ONNX and compare every runtime on ``images``.

    ``model_or_path``: a built ``keras.Model`` or a ``.keras`` file. ``images``: a float32 ``(N, H, W, C)`` array,
    a ``.npz`` file with it under :data:`IMAGES_KEY`, or None for :data:`DEFAULT_IMAGES` deterministic ones. ``out``:
    write report.json, report.md and the ONNX files as ``out/latest`` (the output-directory policy of ``keras-bn
    run``, docs/report.md; ``force`` as ``--force``); None keeps nothing on disk. ``skip``: optional runtimes not to
    run (``export.agreement.OPTIONAL_RUNTIMES``). Bad input raises ``export.errors.UsageError`` (a ValueError)
    naming it; a disagreement does not raise: see ``result.passed`` and ``result.report``.
    """
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import: no C++ start-up chatter
    log = log or (lambda message: None)
    source = None if not isinstance(model_or_path, str | os.PathLike) else Path(model_or_path)
    if out is not None:
        try:
            outdir.check_out_dir(Path(out), force=force)
        except outdir.OutputDirError as exc:
            raise UsageError(str(exc)) from None
    _check_skip(skip)
    keras_model = load_keras_model(source) if source is not None else model_or_path
    if not hasattr(keras_model, "inputs") or not hasattr(keras_model, "layers"):
        raise UsageError(f"model_or_path must be a keras.Model or a .keras file, got {type(keras_model).__name__}")
    shape = _image_shape(keras_model)
    if images is None:
        x, described = default_images(shape), f"{DEFAULT_IMAGES} deterministic uniform [0, 1) images (default_rng(0))"
    elif isinstance(images, str | os.PathLike) and Path(images).is_dir():
        x, described = load_image_dir(Path(images), shape)
    elif isinstance(images, str | os.PathLike):
        x, described = load_images(images, shape), f"{images} (key {IMAGES_KEY!r})"
    else:
        x, described = _checked_array(images, shape), "images given as an array"
    t0 = time.perf_counter()
    torch_model = _to_torch(keras_model)  # an unsupported layer is refused before anything is created in out
    context = _Context(keras_model, torch_model, time.perf_counter() - t0, source, x, described, command or [], started)
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            return _check_in(context, Path(tmp), skip, log)
    try:
        held = outdir.OutputDir(Path(out)).open()
    except outdir.OutputDirError as exc:
        raise UsageError(str(exc)) from None
    try:
        result = _check_in(context, held.staging, skip, log)
        result.out = held.publish()
    finally:
        held.close()
    return result


def _check_skip(skip: Collection[str]) -> None:
    from export.agreement import OPTIONAL_RUNTIMES

    unknown = sorted(set(skip) - set(OPTIONAL_RUNTIMES))
    if unknown:
        raise UsageError(
            f"--skip {', '.join(unknown)}: not an optional runtime; those are {', '.join(OPTIONAL_RUNTIMES)}"
        )


def _checked_array(images: Any, shape: tuple[int, int, int]) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.float32 or images.ndim != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
        raise UsageError(f"images is {images.dtype} {images.shape}; the model needs {_wanted(shape)}")
    return images


@dataclass(frozen=True)
class _Context:
    keras_model: Any
    torch_model: Any
    convert_seconds: float
    source: Path | None
    images: np.ndarray
    images_source: str
    command: list[str]
    started: float


def _check_in(context: _Context, stage: Path, skip: Collection[str], log: Callable[[str], None]) -> CheckResult:
    """Export and compare with every file in ``stage``; write report.md and report.json there."""
    from export.pipeline import agreement_summary

    agreement, timings = _compare(context, stage / ONNX_SUBDIR, skip, log)
    summary = agreement_summary(agreement)
    onnx_files = {form: Path(path).relative_to(stage).as_posix() for form, path in summary["onnx_files"].items()}
    report = rpt.check_report(
        command=context.command,
        model={
            "name": context.keras_model.name,
            "path": None if context.source is None else str(context.source),
            "sha256": None if context.source is None else outdir.sha256_file(context.source),
            "input_shape": [None, *context.images.shape[1:]],
            "layers": len(_layers(context.keras_model)),
            "bn_layers": _bn_layers(context.keras_model),
        },
        images={"source": context.images_source, "n": len(context.images), "dtype": "float32"},
        agreement=summary,
        onnx_files=onnx_files,
        timings=timings,
    )
    rpt.write_set(report, stage, started=context.started, render=rpt.render_check_markdown)
    return CheckResult(report=report, agreement=agreement, timings=timings)
