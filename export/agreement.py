"""Do the runtimes agree? Logits of one trained LeNet-BN pair in every runtime, compared pairwise.

Criterion (per pair a, b over the same n inputs, logits compared in float64):

    max_abs       = max_ij |a_ij - b_ij|
    max_abs_logit = max_ij max(|a_ij|, |b_ij|)
    max_rel       = max_abs / max(1, max_abs_logit)        (the quantity held to ``rtol``)
    pass          <=> max_rel <= rtol (1e-5)  and  argmax(a_i) == argmax(b_i) for every i

``max_rel`` is relative to the logit scale, not element-wise: a logit that crosses zero would make
an element-wise ratio unbounded without saying anything about the network.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from export import runtimes
from export.onnx.exporters import FORMS, export_all

__all__ = [
    "LITERT_FILE",
    "OPTIONAL_RUNTIMES",
    "RTOL",
    "RUNTIMES",
    "AgreementError",
    "AgreementResult",
    "PairAgreement",
    "compare_runtimes",
]

#: float32 logits of a ~45k-parameter net differ by re-association only: ~1e-6 relative in practice
#: (4e-6 on logits up to 9 for the Keras export in ORT); 1e-5 is SPEC.md §8.4's float32 bound for y.
RTOL = 1e-5

#: runtime name -> what runs. "ort:<form>" is ONNX Runtime on that export form (graph optimizations
#: off, so BatchNormalization nodes run as such); "onnx.reference" runs the torch BN-node export.
#: The runtimes of :data:`OPTIONAL_RUNTIMES` come with the ``deploy`` extra and are skipped (and
#: listed in ``AgreementResult.skipped``) when it is not installed.
RUNTIMES: dict[str, str] = {
    "keras": "Keras model.predict (TensorFlow)",
    "keras:jax": "the same model saved as .keras, loaded and predicted under the JAX backend (subprocess)",
    "torch": "PyTorch eager, eval()",
    "ort:keras": "ONNX Runtime, Keras export with BatchNormalization nodes",
    "ort:keras-folded": "ONNX Runtime, Keras export folded by export.onnx.fold",
    "ort:torch": "ONNX Runtime, PyTorch export with BatchNormalization nodes",
    "ort:torch-folded": "ONNX Runtime, PyTorch export folded by the exporter",
    **{f"openvino:{form}": f"OpenVINO CPU plugin (float32) on the {form} ONNX file" for form in FORMS},
    "litert": "Keras model.export(format='litert'), float32, LiteRT interpreter (XNNPACK)",
    "onnx.reference": "onnx.reference.ReferenceEvaluator, PyTorch export with BatchNormalization nodes",
    "spec": "NumPy float64 forward with spec.batch_norm_infer",
}

#: optional runtime -> the module it needs (``export.runtimes.OPTIONAL_RUNTIMES`` by family).
OPTIONAL_RUNTIMES: dict[str, str] = {
    name: runtimes.OPTIONAL_RUNTIMES[name.split(":")[0] if name.startswith("openvino") else name]
    for name in RUNTIMES
    if name.startswith(("openvino", "litert", "keras:"))
}

#: file name of the LiteRT export written beside the ONNX files.
LITERT_FILE = "lenet_bn.tflite"


class AgreementError(AssertionError):
    """Raised by :meth:`AgreementResult.raise_for_failure`; the message names each failing pair."""


@dataclass(frozen=True)
class PairAgreement:
    a: str
    b: str
    max_abs: float
    max_rel: float
    argmax_agreement: float
    max_abs_logit: float
    #: the first input whose argmax differs if any does, else the input whose logits differ most
    worst_index: int
    n: int
    rtol: float

    @property
    def tolerance(self) -> float:
        return self.rtol * max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance and self.argmax_agreement == 1.0

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{verdict} {self.a} vs {self.b}: max|d| {self.max_abs:.3g} (tolerance {self.tolerance:.3g}), "
            f"argmax agreement {self.argmax_agreement:.2%} on {self.n} inputs, worst input {self.worst_index}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "tolerance": self.tolerance, "passed": self.passed}


def compare_pair(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray, *, rtol: float = RTOL) -> PairAgreement:
    """Agreement of two logit arrays on their common leading inputs (see module docstring)."""
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError(f"no inputs to compare between {a_name} and {b_name}")
    a64, b64 = np.asarray(a[:n], np.float64), np.asarray(b[:n], np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"{a_name} logits {a64.shape} and {b_name} logits {b64.shape} differ in shape")
    diff = np.abs(a64 - b64).reshape(n, -1).max(axis=1)
    max_abs_logit = float(max(np.abs(a64).max(), np.abs(b64).max()))
    same = a64.argmax(axis=1) == b64.argmax(axis=1)
    worst = int(diff.argmax()) if same.all() else int(np.flatnonzero(~same)[0])
    max_abs = float(diff.max())
    return PairAgreement(
        a=a_name,
        b=b_name,
        max_abs=max_abs,
        max_rel=max_abs / max(1.0, max_abs_logit),
        argmax_agreement=float(same.mean()),
        max_abs_logit=max_abs_logit,
        worst_index=worst,
        n=n,
        rtol=rtol,
    )


@dataclass
class AgreementResult:
    runtimes: list[str]
    pairs: list[PairAgreement]
    onnx_files: dict[str, str]
    n_inputs: int
    rtol: float
    #: inputs each runtime saw (onnx.reference may run on a prefix only)
    counts: dict[str, int] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: runtimes of :data:`RUNTIMES` that did not run: ``[{"runtime": name, "reason": one line}]``
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: runtime -> the versions that produced its logits (package name and version, in words)
    versions: dict[str, str] = field(default_factory=dict)
    #: the LiteRT export: ``{"file", "bn_form", "ops"}`` (see export.runtimes.litert_batchnorm_form); empty if skipped
    litert: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    def failures(self) -> list[PairAgreement]:
        return [p for p in self.pairs if not p.passed]

    def to_json(self) -> list[dict]:
        """The ``agreement`` list of report.json: one dict per pair with at least
        ``a, b, max_abs, max_rel, argmax_agreement, max_abs_logit`` (plus ``worst_index, n, rtol,
        tolerance, passed``)."""
        return [p.to_json() for p in self.pairs]

    def to_markdown(self) -> str:
        lines = [
            "| a | b | max abs | max rel | argmax agreement | max abs logit | n | pass |",
            "|---|---|---:|---:|---:|---:|---:|:---:|",
        ]
        for p in self.pairs:
            lines.append(
                f"| {p.a} | {p.b} | {p.max_abs:.2e} | {p.max_rel:.2e} | {p.argmax_agreement:.2%} | "
                f"{p.max_abs_logit:.3g} | {p.n} | {'yes' if p.passed else '**no**'} |"
            )
        return "\n".join(lines)

    def summary(self) -> dict:
        """What a report needs beside the pairs: runtimes run and skipped, their versions, the LiteRT BN form."""
        return {
            "runtimes": list(self.runtimes),
            "skipped": [dict(s) for s in self.skipped],
            "runtime_versions": dict(self.versions),
            "litert": {k: v for k, v in self.litert.items() if k != "file"},
        }

    def raise_for_failure(self) -> None:
        failures = self.failures()
        if failures:
            raise AgreementError(
                f"{len(failures)} of {len(self.pairs)} runtime pairs disagree beyond rtol={self.rtol}:\n"
                + "\n".join(p.describe() for p in failures)
            )


def _as_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8 and images.ndim == 3:
        from mnist_data import to_nhwc_float

        images = to_nhwc_float(images)
    elif not (images.dtype == np.float32 and images.ndim == 4):
        raise ValueError(
            f"images must be uint8 (N, H, W) or float32 NHWC (N, H, W, C), got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError("images is empty: compare_runtimes needs at least one image")
    return images


def _version(*distributions: str) -> str:
    """``"name version, ..."``; tensorflow is found under either of its distribution names."""
    found = []
    for name in distributions:
        for candidate in (name, "tensorflow-cpu") if name == "tensorflow" else (name,):
            try:
                found.append(f"{name} {importlib.metadata.version(candidate)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _optional_runtimes(skip: Collection[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(optional runtimes to run, skipped ones with the reason) in :data:`RUNTIMES` order."""
    unknown = sorted(set(skip) - set(OPTIONAL_RUNTIMES))
    if unknown:
        raise ValueError(f"skip names {unknown}, which are not optional runtimes; those are {list(OPTIONAL_RUNTIMES)}")
    reasons = {module: runtimes.missing_module(module) for module in set(OPTIONAL_RUNTIMES.values())}
    run, skipped = [], []
    for name, module in OPTIONAL_RUNTIMES.items():
        if name in skip:
            skipped.append({"runtime": name, "reason": "skipped by the caller (skip=...)"})
        elif reasons[module]:
            skipped.append({"runtime": name, "reason": reasons[module]})
        else:
            run.append(name)
    return run, skipped


def _check_onnx_files(onnx_files: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
    missing = sorted(set(FORMS) - set(onnx_files))
    if missing:
        raise ValueError(f"onnx_files lacks the forms {missing}; expected {sorted(FORMS)}")
    for form in FORMS:
        runtimes.load_onnx(onnx_files[form], what=f"onnx_files[{form!r}]")
    return {form: str(path) for form, path in onnx_files.items()}


def _all_logits(
    keras_model, torch_model, x, x_reference, files, wanted, *, litert_dir: Path, tmp: Path, batch_size: int,
    threads: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, object]]:  # fmt: skip
    """(runtime -> logits, runtime -> versions, the LiteRT export) for every runtime that runs."""
    ort_kwargs = {"batch_size": batch_size, "threads": threads}
    litert: dict[str, object] = {}
    logits = {
        "keras": runtimes.run_keras(keras_model, x, batch_size=batch_size),
        "torch": runtimes.run_torch(torch_model, x, batch_size=batch_size),
        **{f"ort:{form}": runtimes.run_ort(files[form], x, **ort_kwargs) for form in FORMS},
        "onnx.reference": runtimes.run_onnx_reference(files["torch"], x_reference),
    }
    if "spec" in wanted:
        logits["spec"] = runtimes.run_spec(keras_model, x)
    versions = {
        "keras": _version("keras", "tensorflow"),
        "torch": _version("torch"),
        **{f"ort:{form}": _version("onnxruntime") for form in FORMS},
        "onnx.reference": _version("onnx"),
        "spec": _version("numpy"),
    }
    for form in FORMS:
        if f"openvino:{form}" in wanted:
            logits[f"openvino:{form}"] = runtimes.run_openvino(files[form], x, **ort_kwargs)
            versions[f"openvino:{form}"] = _version("openvino")
    if "litert" in wanted:
        path = litert_dir / LITERT_FILE
        runtimes.export_litert(keras_model, path)
        logits["litert"] = runtimes.run_litert(path, x, **ort_kwargs)
        versions["litert"] = _version("ai-edge-litert", "tensorflow")
        litert = {
            "file": str(path),
            "bn_form": runtimes.litert_batchnorm_form(path),
            "ops": runtimes.litert_op_names(path),
        }
    if "keras:jax" in wanted:
        model_path = tmp / "model.keras"
        keras_model.save(model_path)
        logits["keras:jax"], jax_versions = runtimes.run_keras_backend(
            model_path, x, backend="jax", batch_size=batch_size
        )
        versions["keras:jax"] = ", ".join(f"{k} {v}" for k, v in jax_versions.items())
    return logits, versions, litert


def compare_runtimes(
    keras_model,
    torch_model,
    images,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    onnx_files: Mapping[str, str | os.PathLike[str]] | None = None,
    rtol: float = RTOL,
    reference_limit: int | None = None,
    threads: int | None = None,
    batch_size: int = 1000,
    skip: Collection[str] = (),
    without_spec: str | None = None,
) -> AgreementResult:
    """Run the same images through every runtime of :data:`RUNTIMES` and compare all pairs.

    ``keras_model`` and ``torch_model`` must hold the same weights (``torch_ref.keras_to_torch``).
    ``images``: uint8 (N, 28, 28) as loaded, or float32 NHWC, N >= 1. The ONNX files are
    ``onnx_files`` (form -> path, as :func:`export.onnx.exporters.export_all` returns; each must be a
    readable ONNX model, else ValueError naming it) or are exported into ``out_dir`` (a temporary
    directory if None; then the paths in the result are gone afterwards); the LiteRT file goes to
    ``out_dir`` too. ``reference_limit`` runs ``onnx.reference`` (~5 ms per image) on the first that
    many images only; its pairs then say so in ``n``. The :data:`OPTIONAL_RUNTIMES` whose module is
    missing, and those named in ``skip``, do not run and are listed in ``result.skipped`` with the
    reason. ``without_spec``: a reason not to run ``spec`` (its NumPy forward knows LeNet-style chains only, see
    ``export.runtimes.run_spec``); it is then listed in ``result.skipped`` with that reason. Nothing is raised on
    disagreement: check ``result.passed`` or call ``result.raise_for_failure()``.
    """
    x = _as_images(images)
    temporary = onnx_files is None and out_dir is None
    if reference_limit is not None and reference_limit < 1:
        raise ValueError(f"reference_limit must be >= 1 or None, got {reference_limit}")
    optional, skipped = _optional_runtimes(skip)
    if without_spec is not None:
        skipped.append({"runtime": "spec", "reason": without_spec})
    files = _check_onnx_files(onnx_files) if onnx_files is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        if files is None:
            exported = export_all(keras_model, torch_model, out_dir if out_dir is not None else tmp)
            files = {form: str(path) for form, path in exported.items()}
        x_reference = x if reference_limit is None else x[:reference_limit]
        logits, versions, litert = _all_logits(
            keras_model, torch_model, x, x_reference, files, {*optional, *([] if without_spec else ["spec"])},
            litert_dir=Path(out_dir if out_dir is not None else tmp), tmp=Path(tmp), batch_size=batch_size,
            threads=threads,
        )  # fmt: skip
    names = [name for name in RUNTIMES if name in logits]
    pairs = [compare_pair(a, logits[a], b, logits[b], rtol=rtol) for i, a in enumerate(names) for b in names[i + 1 :]]
    if out_dir is None:  # the LiteRT file was written to the temporary directory, gone now
        litert.pop("file", None)
    return AgreementResult(
        runtimes=names,
        pairs=pairs,
        onnx_files={} if temporary else files,
        n_inputs=len(x),
        rtol=rtol,
        counts={name: len(logits[name]) for name in names},
        logits={name: logits[name] for name in names},
        skipped=skipped,
        versions={name: versions[name] for name in names},
        litert=litert,
    )
