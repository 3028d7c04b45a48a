"""Markdown tables of ``bench_recipes.py``'s JSON: one formatting for its printout and for README.md.

``bench/bench_recipes.py`` prints these lines after training (and with ``--from-json``); ``tools/readme_tables.py``
renders the same lines into README.md, so the two cannot drift apart. Pure Python over the JSON (no TensorFlow):
``result`` is one entry of the file's ``results``, i.e. one recipe with its variants' runs and per-epoch summaries.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

__all__ = ["bn1_lines", "epoch_table", "header_line", "variant_label", "wall_seconds"]

#: JSON variant key -> what the tables and plots call it
VARIANT_LABELS = {"ours": "keras_bn.BatchNorm", "keras": "Keras' BatchNormalization", "none": "no BN"}
#: d2l's chapter trains two BN versions: its from-scratch one (our layer's "d2l" convention) and the framework's
D2L_LABELS = {"ours": "keras_bn.BatchNorm, d2l convention (from scratch)", "keras": "Keras' BN (d2l's concise)"}


def variant_label(recipe: str, variant: str) -> str:
    """What a table row or plot legend calls ``variant`` of ``recipe``."""
    labels = D2L_LABELS if recipe == "d2l-lenet-bn" else {}
    return labels.get(variant) or VARIANT_LABELS.get(variant, variant)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def header_line(result: Mapping[str, Any]) -> str:
    """Dataset, sizes, epochs and seeds of one recipe's result; "smoke run" unless it ran at full length."""
    seeds = ", ".join(str(s) for s in result["seeds"])
    kind = "full length" if result["full_length"] else "SMOKE RUN (shortened: not the recipe's figures)"
    return (
        f"{result['dataset']} ({result['n_train']:,} train / {result['n_test']:,} test images), "
        f"{result['epochs']} epochs, seeds {seeds}: {kind}"
    )


def epoch_table(result: Mapping[str, Any]) -> list[str]:
    """Per epoch: each variant's test accuracy in % as mean ± sample sd (min..max) over seeds, then the source's."""
    variants = list(result["variants"])
    sources = result.get("source_figures") or {}
    header = ["epoch", *[f"{variant_label(result['recipe'], v)}, test acc. %" for v in variants]]
    header += [f"source, {label}" for label in sources]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for epoch in range(result["epochs"]):
        cells = [str(epoch + 1)]
        for variant in variants:
            s = result["variants"][variant]["summary"]
            cells.append(
                f"{_pct(s['mean'][epoch])} ± {_pct(s['std'][epoch])} ({_pct(s['min'][epoch])}..{_pct(s['max'][epoch])})"
            )
        for figures in sources.values():  # JSON keys are strings: {"1": 0.93, "10": 0.98}
            value = figures.get(str(epoch + 1))
            cells.append("" if value is None else f"~{100 * value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bn1_lines(result: Mapping[str, Any]) -> list[str]:
    """Learned gamma and beta of ``bn1`` per channel, mean ± sample sd over seeds, for each variant with BN."""
    lines = []
    for variant, entry in result["variants"].items():
        runs = [run for run in entry["runs"] if "bn1_gamma" in run]
        if not runs:
            continue
        for name in ("gamma", "beta"):
            per_channel = zip(*(run[f"bn1_{name}"] for run in runs), strict=True)
            cells = []
            for values in per_channel:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f}")
            lines.append(f"- {variant_label(result['recipe'], variant)}, bn1 {name}: " + ", ".join(cells))
    return lines


def wall_seconds(result: Mapping[str, Any]) -> float:
    """Training wall time of every run of one recipe (they ran one after another)."""
    return sum(run["seconds"] for entry in result["variants"].values() for run in entry["runs"])
