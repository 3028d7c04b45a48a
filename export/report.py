"""The main job's report: ``report.json`` (schema in docs/report.md), ``report.md`` and ``curves.png``.

The numbers are computed by ``export.pipeline`` (training, transfer, export) and ``export.agreement`` (runtime
comparison); :func:`main_job_report` turns that result into one plain dict, :func:`validate_report` checks it against
the schema, and both renderings come from that dict, so the JSON a tool reads and the Markdown a person reads can
never disagree.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "PLOT_PNG",
    "SCHEMA_VERSION",
    "STATUSES",
    "atomic_write_bytes",
    "check_report",
    "collect_versions",
    "disagreement_message",
    "main_job_report",
    "render_check_markdown",
    "render_markdown",
    "validate_report",
    "write_json",
    "write_markdown",
    "write_plot",
    "write_set",
]

# 2: status, failure, machine, wall_time_s, manifest; a diverged run has null accuracies and shorter histories.
SCHEMA_VERSION = 2
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "curves.png"

# Distribution names whose versions decide the numbers; a missing one is recorded as null, not an error.
_PACKAGES = (
    "keras-bn",
    "numpy",
    "keras",
    "tensorflow",
    "tensorflow-cpu",
    "torch",
    "onnx",
    "onnxruntime",
    "tf2onnx",
    "onnxscript",
    "scikit-learn",
    "matplotlib",
)

# Keys every report.json has; docs/report.md describes each, tests/test_cli.py checks them.
COMMON_KEYS = {
    "schema_version": int,
    "tool": str,
    "status": str,
    "machine": dict,
    "runtimes": list,
    "agreement": list,
    "agreement_passed": bool,
    "onnx_files": dict,
    "files": dict,
    "versions": dict,
    "timings_s": dict,
    "wall_time_s": float,
    "manifest": list,
}
#: tool -> the keys only its reports have (``keras-bn run``: a training run; ``keras-bn check``: a user's model)
TOOL_KEYS = {
    "keras-bn run": {"dataset": dict, "config": dict, "accuracy": dict},
    "keras-bn check": {"model": dict, "images": dict},
}
REQUIRED_KEYS = {**COMMON_KEYS, **TOOL_KEYS["keras-bn run"]}
#: ``status``: passed (every pair agrees), disagreed (a pair does not), diverged (``run`` only: training stopped at a
#: non-finite loss; no export or agreement ran).
STATUSES = ("passed", "disagreed", "diverged")
MANIFEST_KEYS = ("path", "size", "sha256")
PAIR_KEYS = ("a", "b", "max_abs", "max_rel", "argmax_agreement", "max_abs_logit")


def collect_versions() -> dict[str, str | None]:
    """Python, platform and the installed version of each package that shapes the result (None if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ValueError if ``report`` lacks a documented key of its tool or has one of the wrong type
    (schema_version 2)."""
    tool = report.get("tool")
    if tool not in TOOL_KEYS:
        raise ValueError(f"report['tool'] is {tool!r}, expected one of {', '.join(TOOL_KEYS)}")
    for key, kind in {**COMMON_KEYS, **TOOL_KEYS[tool]}.items():
        if key not in report:
            raise ValueError(f"report is missing key {key!r}")
        if not isinstance(report[key], kind):
            raise ValueError(f"report[{key!r}] is {type(report[key]).__name__}, expected {kind.__name__}")
    for key in ("bn", "no_bn", "per_epoch") if tool == "keras-bn run" else ():
        if key not in report["accuracy"]:
            raise ValueError(f"report['accuracy'] is missing {key!r}")
    if report["status"] not in STATUSES:
        raise ValueError(f"report['status'] is {report['status']!r}, expected one of {', '.join(STATUSES)}")
    if (report["status"] == "passed") != report["agreement_passed"]:
        raise ValueError(f"report['status'] {report['status']!r} contradicts agreement_passed")
    for i, pair in enumerate(report["agreement"]):
        missing = [k for k in PAIR_KEYS if k not in pair]
        if missing:
            raise ValueError(f"report['agreement'][{i}] is missing {missing}")
    for i, entry in enumerate(report["manifest"]):
        missing = [k for k in MANIFEST_KEYS if k not in entry]
        if missing:
            raise ValueError(f"report['manifest'][{i}] is missing {missing}")


def main_job_report(config: Any, result: Any, *, files: Mapping[str, str]) -> dict[str, Any]:
    """The plain dict that report.json and report.md of ``keras-bn run`` are rendered from (schema: docs/report.md).

    ``config`` is an ``export.pipeline.MainJobConfig``, ``result`` its ``MainJobResult``; ``files`` every file of
    the set by role. Keys filled in by :func:`write_set`: ``wall_time_s``, ``manifest``."""
    from export.machine import machine_info

    bn = result.trained["bn"].model
    agreement, dataset = result.agreement, result.dataset
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "keras-bn run",
        "status": result.status,
        "failure": result.failure,
        "command": list(config.command),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "dataset": {
            "name": dataset.name,
            "requested": config.dataset,
            "source": dataset.source,
            "embedded": dataset.embedded,
            "canonical": dataset.canonical,
            "file_md5": dict(dataset.file_md5),
            "n_train": len(dataset.y_train),
            "n_test": len(dataset.y_test),
        },
        "config": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "model": config.model,
            "recipe": config.recipe.to_config(),
            "optimizer": config.recipe.recipe.optimizer,
            "sgd_momentum": config.recipe.recipe.sgd_momentum,
            "seed": config.seed,
            "limit": config.limit,
            "bn_layer": config.bn_layer,
            "convention": getattr(bn.get_layer("bn1"), "convention", "keras"),
            "bn_momentum": float(bn.get_layer("bn1").momentum),
            "epsilon": float(bn.get_layer("bn1").epsilon),
        },
        "accuracy": {
            "bn": result.trained["bn"].test_accuracy,
            "no_bn": result.trained["no_bn"].test_accuracy if "no_bn" in result.trained else None,
            "per_epoch": result.per_epoch,
            "diverged": {key: t.diverged for key, t in result.trained.items() if t.diverged is not None},
        },
        **agreement_keys(agreement),
        "onnx_files": dict(result.onnx_files),
        "files": dict(files),
        "versions": collect_versions(),
        "timings_s": result.timings,
    }


def agreement_keys(agreement: Mapping[str, Any] | None) -> dict[str, Any]:
    """The report's agreement keys from ``export.pipeline.agreement_summary`` (empty ones when nothing ran)."""
    return {
        "runtimes": agreement["runtimes"] if agreement else [],
        "agreement_images": agreement["n_inputs"] if agreement else 0,
        "tolerance": agreement["tolerance"] if agreement else {},
        "agreement": agreement["pairs"] if agreement else [],
        "agreement_passed": bool(agreement and agreement["passed"]),
        "skipped_runtimes": agreement["summary"]["skipped"] if agreement else [],
        "runtime_versions": agreement["summary"]["runtime_versions"] if agreement else {},
        "litert": agreement["summary"]["litert"] if agreement else {},
    }


def check_report(
    *,
    command: list[str],
    model: dict[str, Any],
    images: dict[str, Any],
    agreement: Mapping[str, Any],
    onnx_files: Mapping[str, str],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The report dict of ``keras-bn check`` (schema: docs/report.md); ``agreement`` from
    ``export.pipeline.agreement_summary``. Keys filled in by :func:`write_set`: ``wall_time_s``, ``manifest``."""
    from export.machine import machine_info

    files = {"report_md": REPORT_MD, "report_json": REPORT_JSON}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "keras-bn check",
        "status": "passed" if agreement["passed"] else "disagreed",
        "command": list(command),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "model": model,
        "images": images,
        **agreement_keys(agreement),
        "onnx_files": dict(onnx_files),
        "files": files,
        "versions": collect_versions(),
        "timings_s": timings,
    }


def disagreement_message(pairs: list[Mapping[str, Any]], inputs: str = "test image") -> str:
    """One line naming how many pairs failed, the worst pair, its numbers and its worst input."""
    bad = [p for p in pairs if not p["passed"]]
    worst = max(bad, key=lambda p: (p["argmax_agreement"] < 1.0, p["max_rel"]))
    return (
        f"agreement FAILED for {len(bad)} of {len(pairs)} runtime pairs; worst: {worst['a']} vs {worst['b']}, "
        f"max |Δ| {worst['max_abs']:.3e} > bound {worst['rtol']:.0e}·max(1, max|logit| "
        f"{worst['max_abs_logit']:.3g}) = {worst['tolerance']:.3e} or argmax agreement "
        f"{100 * worst['argmax_agreement']:.2f}% < 100%; worst input: {inputs} {worst['worst_index']} "
        f"(full table in report.md)"
    )


def write_set(
    report: dict[str, Any], stage: Path, *, started: float, render: Callable[[Mapping[str, Any]], str] | None = None
) -> None:
    """Write report.md and, last, report.json with the manifest of every other file in ``stage``.

    ``started`` (``time.perf_counter()`` at the command's start) gives ``wall_time_s``; ``render`` is the Markdown
    renderer (default :func:`render_markdown`, the main job's). report.json is validated before it is written."""
    from export import outdir

    report["wall_time_s"] = time.perf_counter() - started
    atomic_write_bytes(stage / REPORT_MD, (render or render_markdown)(_json_safe(report)).encode())
    report["manifest"] = outdir.manifest(stage, exclude=frozenset({REPORT_JSON, outdir.STAGING_MARKER}))
    write_json(report, stage / REPORT_JSON)


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask); mkstemp's 0o600 would hide reports."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path`` and rename it over: never a half-written report."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    """NumPy scalars -> Python numbers, NaN/inf -> None (strict JSON has neither), recursively."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar or 0-d array
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: Mapping[str, Any], path: Path) -> None:
    """Validate and write ``report`` as indented, strict JSON (no NaN)."""
    safe = _json_safe(report)
    validate_report(safe)
    atomic_write_bytes(path, (json.dumps(safe, indent=2, allow_nan=False) + "\n").encode())


# ------------------------------------------------------------------------------------------------------ Markdown


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _loss(values: list[float | None], i: int = -1) -> str:
    """A loss from a per-epoch list; a non-finite one was stored as null (strict JSON), shown as "non-finite"."""
    if not values or not -len(values) <= i < len(values):
        return "n/a"
    return "non-finite" if values[i] is None else f"{values[i]:.4f}"


def _at(values: list[float | None], i: int) -> float | None:
    return values[i] if -len(values) <= i < len(values) else None


_MODEL_LABELS = {"bn": "LeNet-BN", "no_bn": "LeNet (no BN)"}


def _result_line(report: Mapping[str, Any]) -> str:
    status = report["status"]
    if status == "diverged":
        return f"Result: **DIVERGED**. {report.get('failure') or ''}".rstrip()
    return f"Result: **{'PASS' if status == 'passed' else 'FAIL'}**."


def _worst_pair_line(pairs: list[Mapping[str, Any]], input_name: str = "test image") -> list[str]:
    """One sentence naming the pair closest to (or furthest past) its bound, relative to the logit scale."""
    if not pairs:
        return []
    worst = max(pairs, key=lambda p: p["max_abs"] / max(1.0, p["max_abs_logit"]))
    return [
        f"Largest difference: {worst['a']} vs {worst['b']}, max |Δ| {_sci(worst['max_abs'])} on logits up to "
        f"{worst['max_abs_logit']:.3g} ({input_name} {worst.get('worst_index', 'n/a')}).",
        "",
    ]


def _skipped_runtimes_lines(report: Mapping[str, Any]) -> list[str]:
    """One line naming the runtimes that did not run and why, the runtime versions, LiteRT's BN form."""
    lines = []
    skipped = report.get("skipped_runtimes") or []
    if skipped:
        reasons: dict[str, list[str]] = {}
        for entry in skipped:
            reasons.setdefault(entry["reason"], []).append(f"`{entry['runtime']}`")
        lines += ["Skipped runtimes: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in reasons.items()) + ".", ""]
    by_version: dict[str, list[str]] = {}
    for runtime, version in (report.get("runtime_versions") or {}).items():
        by_version.setdefault(version, []).append(f"`{runtime}`")
    if by_version:
        lines += ["Runtime versions: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in by_version.items()) + ".", ""]
    if (report.get("litert") or {}).get("bn_form"):
        lines += [f"LiteRT converter BN form: {report['litert']['bn_form']}.", ""]
    return lines


def _agreement_lines(report: Mapping[str, Any], subject: str = "LeNet-BN", inputs: str = "test images") -> list[str]:
    lines = ["", f"## Agreement across runtimes ({subject}, logits)", ""]
    if report["status"] == "diverged":
        return lines + ["Not run: training diverged, so there was no trained model to export and compare."]
    tol = report.get("tolerance", {})
    lines += [
        f"{report['agreement_images']} {inputs}, float32. Pass: max |Δ| <= "
        f"{tol.get('rel_to_max_logit', 'n/a')} · max(1, max |logit|) and argmax agreement "
        f"{_pct(tol.get('argmax_agreement'))} for every pair. {_result_line(report)}",
        "",
        "Runtimes: " + ", ".join(f"`{r}`" for r in report["runtimes"]) + ".",
        "",
        *_skipped_runtimes_lines(report),
        *_worst_pair_line(report["agreement"], "test image" if inputs == "test images" else "image"),
        "| a | b | max abs Δ | max rel Δ | max abs logit | argmax agreement | worst input | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in report["agreement"]:
        ok = pair.get("passed")
        lines.append(
            f"| {pair['a']} | {pair['b']} | {_sci(pair['max_abs'])} | {_sci(pair['max_rel'])} | "
            f"{pair['max_abs_logit']:.3g} | {_pct(pair['argmax_agreement'])} | {pair.get('worst_index', 'n/a')} | "
            f"{'n/a' if ok is None else ('yes' if ok else '**no**')} |"
        )
    return lines


def _recipe_title(cfg: Mapping[str, Any]) -> str:
    recipe = cfg.get("recipe") or {}
    title = recipe.get("title") or cfg.get("model") or "LeNet-BN"
    note = recipe.get("dataset_note")
    return f"{title} ({note})" if note else title


def _optimizer_text(cfg: Mapping[str, Any]) -> str:
    """What really trained: a report of an Adam recipe must not say SGD."""
    optimizer = cfg.get("optimizer", "sgd")
    if optimizer == "sgd":
        return f"SGD lr {cfg['lr']} momentum {cfg.get('sgd_momentum', 0.0)}"
    return f"{optimizer.capitalize()} lr {cfg['lr']}"


def _files_versions_timings(report: Mapping[str, Any]) -> list[str]:
    """The closing sections every report shares: ONNX files (when any), package versions, step timings."""
    lines: list[str] = []
    if report["onnx_files"]:
        lines += ["", "## ONNX files", "", "| model | file |", "|---|---|"]
        lines += [f"| {name} | `{path}` |" for name, path in report["onnx_files"].items()]
    lines += ["", "## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else 'not installed'} |" for k, v in report["versions"].items()]
    lines += ["", "## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: data, accuracy with and without BN, the agreement table, files, versions."""
    from export.machine import describe_machine

    ds, cfg, acc = report["dataset"], report["config"], report["accuracy"]
    lines = [
        "# keras-bn main job report",
        "",
        _result_line(report),
        "",
        f"Dataset: **{ds['name']}** ({ds['n_train']} train / {ds['n_test']} test images). Source: {ds['source']}.",
        "",
        f"Model and recipe: {_recipe_title(cfg)}. Training: {cfg['epochs']} epochs, batch size {cfg['batch_size']}, "
        f"{_optimizer_text(cfg)}, seed {cfg['seed']}; BN layer `{cfg['bn_layer']}` (convention {cfg['convention']}, "
        f"momentum {cfg['bn_momentum']}, epsilon {cfg['epsilon']}). Same initial kernels and optimizer for both nets.",
        "",
        f"Machine: {describe_machine(report['machine'])}. Wall time of the run: {report['wall_time_s']:.1f} s.",
        "",
        "## Accuracy",
        "",
        "| model | test accuracy | final train loss | final train accuracy |",
        "|---|---|---|---|",
    ]
    per_epoch = acc["per_epoch"]
    for key, label in _MODEL_LABELS.items():
        hist = per_epoch[key]
        lines.append(f"| {label} | {_pct(acc[key])} | {_loss(hist['loss'])} | {_pct(_at(hist['accuracy'], -1))} |")
    for key, at in acc.get("diverged", {}).items():
        lines += ["", f"{_MODEL_LABELS[key]} diverged: non-finite loss at epoch {at['epoch']}, batch {at['batch']}."]
    lines += ["", f"Per-epoch curves: `{report['files']['plot']}`.", ""]
    lines += ["| epoch | " + " | ".join(["BN val acc", "no-BN val acc", "BN loss", "no-BN loss"]) + " |"]
    lines += ["|---|---|---|---|---|"]
    bn, plain = per_epoch["bn"], per_epoch["no_bn"]
    for i in range(max(len(bn["loss"]), len(plain["loss"]))):
        lines.append(
            f"| {i + 1} | {_pct(_at(bn['val_accuracy'], i))} | {_pct(_at(plain['val_accuracy'], i))} | "
            f"{_loss(bn['loss'], i)} | {_loss(plain['loss'], i)} |"
        )
    steps = -(-ds["n_train"] // cfg["batch_size"])
    if 0 <= cfg["bn_momentum"] < 1:
        lines += [
            "",
            f"BN's test accuracy uses the moving statistics, an exponential average with momentum "
            f"{cfg['bn_momentum']} that remembers ~{1 / (1 - cfg['bn_momentum']):.0f} steps; with {steps} steps per "
            "epoch they lag the weights in early epochs, so LeNet-BN's first test accuracies can trail its training "
            "accuracy.",
        ]
    lines += _agreement_lines(report)
    lines += _files_versions_timings(report)
    return "\n".join(lines) + "\n"


def render_check_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report of ``keras-bn check``: model, BN layers, images, agreement, files, versions."""
    from export.machine import describe_machine

    model, images = report["model"], report["images"]
    lines = [
        "# keras-bn check report",
        "",
        _result_line(report),
        "",
        f"Model: `{model['name']}`" + (f" from `{model['path']}`" if model.get("path") else "")
        + f", input {tuple(model['input_shape'])}, {model['layers']} layers, {len(model['bn_layers'])} BN layers. "
        f"Converted to PyTorch by `torch_ref.from_keras`; ONNX with BN kept and folded.",
        "",
        f"Images: {images['n']}, {images['source']}.",
        "",
        f"Machine: {describe_machine(report['machine'])}. Wall time: {report['wall_time_s']:.1f} s.",
        "",
        "| BN layer | type | convention | momentum | epsilon |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for bn in model["bn_layers"]:
        lines.append(f"| {bn['name']} | {bn['type']} | {bn['convention']} | {bn['momentum']} | {bn['epsilon']} |")
    lines += _agreement_lines(report, subject=model["name"], inputs="images")
    lines += _files_versions_timings(report)
    return "\n".join(lines) + "\n"


def write_markdown(report: Mapping[str, Any], path: Path) -> None:
    atomic_write_bytes(path, render_markdown(_json_safe(report)).encode())


# ---------------------------------------------------------------------------------------------------------- plot


def write_plot(per_epoch: Mapping[str, Mapping[str, list[float]]], path: Path, title: str) -> None:
    """Two panels, loss and accuracy per epoch; train solid, validation dashed; BN vs no BN by colour."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display on CI or over ssh
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    styles = {"bn": ("LeNet-BN", "tab:blue"), "no_bn": ("LeNet (no BN)", "tab:orange")}
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, (label, colour) in styles.items():
            hist = per_epoch[key]
            epochs = range(1, len(hist[metric]) + 1)
            ax.plot(epochs, hist[metric], color=colour, marker="o", label=f"{label} train")
            if hist.get(f"val_{metric}"):
                ax.plot(epochs, hist[f"val_{metric}"], color=colour, ls="--", marker="x", label=f"{label} test")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
