"""Regenerate README.md's result tables from committed report.json files, so its figures cannot go stale.

Each generated block sits between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->`` and is
rendered from one report in ``docs/results/`` (a verbatim copy of the ``OUT/latest/report.json`` that a real
``keras-bn run --out OUT`` wrote; ``keras-bn verify OUT`` checks the set it came from):

    python tools/readme_tables.py            # rewrite README.md's blocks
    python tools/readme_tables.py --check    # exit 1 if README.md differs from what the reports say (tests run this)

To refresh a figure, rerun the command the block names, copy its ``report.json`` over the file in ``docs/results/``
and run this script. Every block names the machine (CPU model and vector extensions) the figure came from.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"

#: Report files in docs/results/ and the command that produced each (printed beside the figures).
REPORTS = {
    "main-job": "keras-bn run --out keras-bn-out",
    "mnist-2-epochs": "keras-bn run --dataset mnist --data-dir ../shared/data --epochs 2 --out mnist-out",
}
#: Full-length recipe runs (issue #12), one seed each; their reports predate schema 2, so they name no machine.
RECIPE_REPORTS = {
    "d2l-lenet-bn-fashion": "keras-bn run --model d2l-lenet-bn --dataset fashion --data-dir ../shared/data",
    "lenet5-mnist": "keras-bn run --model lenet5 --dataset mnist --data-dir ../shared/data",
}
#: Packages whose versions the "versions" block lists, in this order.
PROVED_PACKAGES = ("tensorflow-cpu", "keras", "numpy", "torch", "onnx", "onnxruntime", "tf2onnx", "onnxscript")

_BLOCK = re.compile(
    r"(<!-- BEGIN generated:(?P<name>[\w-]+) -->\n?)(?P<body>.*?)(<!-- END generated:(?P=name) -->)", re.S
)


def load_report(name: str, results: Path = RESULTS) -> dict[str, Any]:
    path = results / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"readme_tables: cannot read {path}: {error}") from None


def _machine(report: Mapping[str, Any]) -> str:
    machine = report.get("machine")
    if not machine:
        return "an unrecorded machine"
    extensions = " ".join(machine.get("vector_extensions") or []) or "extensions unknown"
    return f"{machine['cpu_model']}, {machine.get('usable_cpus', '?')} CPUs ({extensions})"


def _wall_s(report: Mapping[str, Any]) -> float:
    return float(report["wall_time_s"])


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _final(history: Mapping[str, list[float]], key: str) -> float:
    return history[key][-1]


def render_versions(reports: Mapping[str, dict[str, Any]]) -> str:
    report = reports["main-job"]
    versions = report["versions"]
    listed = [f"{name} {versions[name]}" for name in PROVED_PACKAGES if versions.get(name)]
    return f"{', '.join(listed)} (Python {versions.get('python', '?')}; {_machine(report)}).\n"


def render_main_job(reports: Mapping[str, dict[str, Any]]) -> str:
    report = reports["main-job"]
    config, dataset = report["config"], report["dataset"]
    accuracy, per_epoch = report["accuracy"], report["accuracy"]["per_epoch"]
    lines = [
        f"A real run of the first command (`{REPORTS['main-job']}`) on {_machine(report)}: "
        f"{_wall_s(report):.0f} s wall after the install; seed {config['seed']}, {config['epochs']} epochs, batch "
        f"{config['batch_size']}, {config['optimizer'].upper()} lr {config['lr']:g}, momentum "
        f"{config.get('sgd_momentum', 0):g}, {dataset['n_test']} test images of `{dataset['name']}`. "
        "Accuracies move by a few tenths between CPUs (float32 reduction order); the tables are regenerated from "
        "[`docs/results/main-job.json`](docs/results/main-job.json) by `python tools/readme_tables.py`.",
        "",
        "| model | test accuracy | final train loss |",
        "|---|---|---|",
        f"| LeNet-BN (`keras_bn.BatchNorm`) | {_pct(accuracy['bn'])} | {_final(per_epoch['bn'], 'loss'):.4f} |",
        f"| LeNet (no BN) | {_pct(accuracy['no_bn'])} | {_final(per_epoch['no_bn'], 'loss'):.4f} |",
        "",
    ]
    pairs = report["agreement"]
    scale = max(p["max_abs_logit"] for p in pairs)
    lines += [
        f"| runtime vs `spec` (float64 NumPy forward) | max \\|Δ\\| of logits (up to {scale:.1f}) | argmax agreement |",
        "|---|---|---|",
    ]
    for pair in pairs:
        if "spec" in (pair["a"], pair["b"]):
            other = pair["a"] if pair["b"] == "spec" else pair["b"]
            lines.append(f"| {other} | {pair['max_abs']:.2e} | {_pct(pair['argmax_agreement'])[:-4]}% |")
    worst = max(pairs, key=lambda p: p["max_rel"])
    verdict = "pass" if report["agreement_passed"] else "do NOT all pass"
    tolerance = report.get("tolerance", {}).get("rel_to_max_logit", worst["rtol"])
    lines += [
        "",
        f"All {len(pairs)} pairs {verdict} (bound {tolerance:g}·{scale:.1f} = {tolerance * scale:.1e}; worst pair "
        f"{worst['a']} vs {worst['b']}, {worst['max_abs']:.1e}).",
    ]
    return "\n".join(lines) + "\n"


def render_mnist(reports: Mapping[str, dict[str, Any]]) -> str:
    report = reports["mnist-2-epochs"]
    pairs = report["agreement"]
    worst = max(pairs, key=lambda p: p["max_rel"])
    scale = max(p["max_abs_logit"] for p in pairs)
    verdict = "all pairs pass" if report["agreement_passed"] else "NOT all pairs pass"
    return (
        f"On full MNIST (`{REPORTS['mnist-2-epochs']}`, {_machine(report)}, {_wall_s(report):.0f} s): BN "
        f"{_pct(report['accuracy']['bn'])}, no BN {_pct(report['accuracy']['no_bn'])}, {verdict} on the "
        f"{report['dataset']['n_test']:,} test images (worst {worst['max_abs']:.1e} on logits up to {scale:.1f}).\n"
    )


def render_recipes(reports: Mapping[str, dict[str, Any]]) -> str:
    lines = [
        "| command (seed 0, 10 epochs) | BN | no BN | test accuracy per epoch, BN / no BN | runtime pairs |",
        "|---|---|---|---|---|",
    ]
    for name, command in RECIPE_REPORTS.items():
        report = reports[name]
        accuracy, per_epoch = report["accuracy"], report["accuracy"]["per_epoch"]
        curves = " / ".join(
            ", ".join(f"{100 * v:.1f}" for v in per_epoch[key]["val_accuracy"]) for key in ("bn", "no_bn")
        )
        passed = sum(p["passed"] for p in report["agreement"])
        lines.append(
            f"| `{command}` | {_pct(accuracy['bn'])} | {_pct(accuracy['no_bn'])} | {curves} | "
            f"{passed}/{len(report['agreement'])} pass on {report['dataset']['n_test']:,} images |"
        )
    machines = {_machine(reports[name]) for name in RECIPE_REPORTS}
    lines += ["", f"Machine: {', '.join(sorted(machines))}; reports in `docs/results/`."]
    if any(reports[name].get("schema_version", 1) < 2 for name in RECIPE_REPORTS):
        lines[-1] += (
            " These runs predate report schema 2 (no machine recorded) and the deploy runtimes (7 runtimes,"
            " 28 pairs); a rerun with the command shown records both."
        )
    return "\n".join(lines) + "\n"


#: Benchmark outputs (``--json``) in docs/results/ and the command that wrote each.
BENCH_OUTPUTS = {
    "bench-inference": "python bench/bench_inference.py --json docs/results/bench-inference.json",
}


def render_inference(reports: Mapping[str, dict[str, Any]]) -> str:
    bench = reports["bench-inference"]
    # machine_info()'s record; files written before it was stored hold describe_machine()'s line instead
    machine = bench["machine"] if isinstance(bench["machine"], str) else _machine(bench)
    rows = bench["rows"]
    baseline = bench["baseline"]
    batch = bench["batch"]
    lines = [
        f"`{BENCH_OUTPUTS['bench-inference']}` on {machine}, {bench['rounds']} interleaved rounds, "
        f"threads: {'; '.join(f'{k} {v}' for k, v in bench['threads'].items())}. Ratios are time / time of "
        f"`{baseline}` (below 1: faster). This CPU only.",
        "",
        f"| runtime | batch-1 median ms | × {baseline} | batch-{batch} ms | images/s | × {baseline} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['runtime']} | {row['batch1_median_ms']:.3f} | {row['latency_vs_baseline']:.2f} | "
            f"{row[f'batch{batch}_median_ms']:.2f} | {row['images_per_s']:.0f} | "
            f"{row['time_vs_baseline_at_batch']:.2f} |"
        )
    for entry in bench.get("skipped", []):
        lines.append(f"\nSkipped: {entry['runtime']}: {entry['reason']}")
    return "\n".join(lines) + "\n"


BENCH_OUTPUTS["convert"] = "nice -n 10 python bench/bench_convert.py --json docs/results/convert.json"


def _onnx(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    return f"{value:.1e}" if value is not None else "n/a (export refused, see below)"


def _diff(value: float | None) -> str:
    return "n/a (dropout)" if value is None else f"{value:.1e}"


def render_convert(reports: Mapping[str, dict[str, Any]]) -> str:
    """Whole-network conversion (issue #13): exactness per model and direction, then time."""
    bench = reports["convert"]
    baseline = bench["baseline"]
    lines = [
        f"`{BENCH_OUTPUTS['convert']}` on {bench['machine']}. Differences are max \\|Δ\\| / max(1, max \\|logit\\|) "
        f"(`export.agreement`): float64 on {bench['f64_images']} MNIST images, float32 and ONNX Runtime (float32, on "
        f"the PyTorch side's export) on {bench['images']}; the training step is the worst parameter or statistic "
        "after one float64 SGD step on each side.",
        "",
        "| model | direction | BN layers | float64 | float32 (argmax) | training step | ONNX BN kept | ONNX folded |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in bench["rows"]:
        lines.append(
            f"| {row['model']} {row['input'][0]}×{row['input'][1]} | {row['direction']} | {row['bn_layers']} | "
            f"{row['float64_max_rel']:.1e} | {row['float32_max_rel']:.1e} ({_pct(row['float32_argmax_agreement'])}) | "
            f"{_diff(row['train_step_max_abs'])} | {_onnx(row, 'onnx_kept_max_rel')} | "
            f"{_onnx(row, 'onnx_folded_max_rel')} |"
        )
    lines += [
        f"\n{row['model']}: no ONNX figures: {row['onnx_error']}" for row in bench["rows"] if row.get("onnx_error")
    ]
    runtimes = list(bench["rows"][0]["inference_ms"]) if bench["rows"] else []
    lines += [
        "",
        f"Conversion time and inference time per batch of {bench['batch']} (median of {bench['rounds']} interleaved "
        f"calls, 1 thread each), × `{baseline}` in brackets. This CPU only.",
        "",
        "| model | convert s | " + " | ".join(runtimes) + " |",
        "|---|---:|" + "---:|" * len(runtimes),
    ]
    for row in bench["rows"]:
        cells = [
            f"{row['inference_ms'][r]:.1f} ms ({row['inference_vs_baseline'][r]:.2f})"
            if r in row["inference_vs_baseline"]
            else (f"{row['inference_ms'][r]:.1f} ms" if r in row["inference_ms"] else "n/a")
            for r in runtimes
        ]
        lines.append(f"| {row['model']} | {row['convert_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Mapping[str, dict[str, Any]]], str]] = {
    "versions": render_versions,
    "main-job": render_main_job,
    "mnist": render_mnist,
    "recipes": render_recipes,
    "inference": render_inference,
    "convert": render_convert,
}


# --- bench/bench_modes.py (issue #14) and bench/bench_recipes.py over seeds (issue #12) ---------------------------

BENCH_OUTPUTS["bench-modes"] = "python bench/bench_modes.py --json docs/results/bench-modes.json"
#: bench_recipes.py's JSON per recipe: full length over seeds 0, 1, 2, run by the command beside each stem.
RECIPE_SEEDS = {
    "d2l-lenet-bn": "python bench/bench_recipes.py --models d2l-lenet-bn --json docs/results/recipes-d2l-lenet-bn.json",
    "lenet5": "python bench/bench_recipes.py --models lenet5 --json docs/results/recipes-lenet5.json",
}


def recipe_seeds_report(recipe: str, results: Path = RESULTS) -> str:
    """``recipes-<recipe>``, or ``recipes-<recipe>.smoke`` (a shortened run) while the full-length file is absent."""
    stem = f"recipes-{recipe}"
    return stem if (results / f"{stem}.json").exists() else f"{stem}.smoke"


BENCH_OUTPUTS |= {recipe_seeds_report(recipe): command for recipe, command in RECIPE_SEEDS.items()}


def recipe_plot_path(recipe: str) -> str:
    """Where tools/recipe_plots.py writes the recipe's figure, relative to the repository root."""
    return f"docs/recipes-{recipe}.png"


def load_bench_module(name: str):
    """A module of bench/ (not a package): the README renders with the very functions the benchmarks print with."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def load_recipe_tables():
    """bench/recipe_tables.py: bench_recipes.py prints the same table, so both come from one function."""
    return load_bench_module("recipe_tables")


def _without_json(argv: list[str]) -> str:
    """The command line without ``--json PATH``: where a run wrote its file is not how to rerun it (the link is)."""
    if "--json" in argv:
        at = argv.index("--json")
        argv = argv[:at] + argv[at + 2 :]
    return " ".join(argv)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def render_recipe_seeds(reports: Mapping[str, dict[str, Any]]) -> str:
    from export.recipes import RECIPES

    tables = load_recipe_tables()
    lines = []
    for recipe_name, command in RECIPE_SEEDS.items():
        name = recipe_seeds_report(recipe_name)
        saved = reports[name]
        result = saved["results"][recipe_name]
        recipe = RECIPES[recipe_name]
        ran = f"`{_without_json(['python', 'bench/bench_recipes.py', *saved['argv']])}`"
        if not result["full_length"]:
            ran += f", standing in until `{command}` has run,"
        lines += [
            f"**{recipe.title}**, {recipe.optimizer.upper()} lr {recipe.lr:g}, batch {recipe.batch_size}; "
            f"{tables.header_line(result)}. {ran} on {_machine(saved)}: "
            f"{_duration(tables.wall_seconds(result))} of training, one run after another "
            f"([`docs/results/{name}.json`](docs/results/{name}.json)).",
            "",
            *tables.epoch_table(result),
            "",
            *tables.bn1_lines(result),
            "",
            f"![{recipe.title}: test accuracy per epoch over seeds]({recipe_plot_path(recipe_name)})",
            "",
        ]
    return "\n".join(lines)


def _allocator(bench: Mapping[str, Any]) -> str:
    """bench_modes' ``--allocator`` as run (reports before it existed ran glibc's own rule)."""
    allocator = bench.get("allocator", {"name": "glibc", "variables": {}})
    variables = ", ".join(f"`{k}={v}`" for k, v in allocator["variables"].items())
    return f"`{allocator['name']}`" + (f" ({variables})" if variables else " (glibc's own rule)")


def render_performance(reports: Mapping[str, dict[str, Any]]) -> str:
    bench = reports["bench-modes"]
    settings, bandwidth, load = bench["settings"], bench["bandwidth"], bench["load_average"]
    shape = "×".join(str(d) for d in settings["shape"])
    floor_ms = 1e3 * bench["layer_bytes_moved"] / (1e9 * bandwidth["gb_per_s"])
    lines = [
        f"`{BENCH_OUTPUTS['bench-modes']}` (ran as `{_without_json(bench['command'].split())}`), "
        f"{bench['date_utc']} UTC, on {bench['machine_as_run']}; "
        f"1-minute load average {load['start']:.1f} at start, {load['end']:.1f} at end; allocator "
        f"{_allocator(bench)}. "
        "**These figures hold for this CPU under this load only; they are not general.**"
        + (" SMOKE RUN (fewer than 7 rounds): not a result." if settings["smoke"] else ""),
        "",
        f"{settings['repeats']} interleaved rounds (LeNet: {settings['lenet_repeats']}) "
        f"per process after {settings['warmup']} warm-up; threads: "
        + "; ".join(f"{k} {v}" for k, v in bench["threads"].items())
        + "; versions: "
        + ", ".join(f"{k} {v}" for k, v in bench["versions"].items())
        + ".",
        "",
        f"Memory floor: a numpy copy moves {bandwidth['gb_per_s']:.1f} GB/s (read + write, one thread); a BN "
        f"training step on {shape} float32 must move at least {bench['layer_bytes_moved'] / 1e6:.0f} MB (8 passes "
        f"over the batch, see `bench/bench_modes.py`), {floor_ms:.1f} ms at that bandwidth.",
        "",
    ]
    rows = {(r["workload"], r["mode"], r["variant"]): r for r in bench["rows"]}
    lines += [
        "| mode | variant | layer step, median ms (IQR) | GB/s (% of copy) | "
        f"LeNet-BN's 4 BN layers alone, ms/call (IQR) | LeNet-BN batch {settings['batch']}, ms/step (IQR) | "
        "samples/s | LeNet-BN page faults/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, variant in dict.fromkeys((r["mode"], r["variant"]) for r in bench["rows"]):
        cells = [mode, variant]
        layer, lenet = rows.get(("layer", mode, variant)), rows.get(("lenet", mode, variant))
        cells += (
            [
                f"{layer['median_ms']:.1f} ({layer['iqr_ms']:.1f})",
                f"{layer['gb_per_s']:.1f} ({layer['fraction_of_bandwidth']:.0%})",
            ]
            if layer
            else ["", ""]
        )
        small = rows.get(("lenet-bn", mode, variant))  # absent where bench_modes ran with --workloads
        cells.append(f"{small['median_ms']:.2f} ({small['iqr_ms']:.2f})" if small else "")
        cells += (
            [f"{lenet['median_ms']:.2f} ({lenet['iqr_ms']:.2f})", f"{lenet['samples_per_s']:.0f}"]
            if lenet
            else ["", ""]
        )
        cells.append(f"{lenet['minor_faults_per_step']:.0f}" if lenet and "minor_faults_per_step" in lenet else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Page faults: the process's minor page faults per LeNet step (median), memory the C allocator gave back to "
        "the OS and touched again; they move a variant's time with what else ran in the process, so a ratio between "
        "variants with very different counts depends on the allocator's state as well as on the code. The `steady` "
        'allocator (`bench/bench_modes.py`, "Allocator") keeps them at 0 for LeNet in every variant.',
        "",
        "Each ratio has a 95% distribution-free interval (order statistics of the per-round ratios; for a ratio of "
        "medians, of each median; `bench/_timing.py`). PASS: the whole interval meets the goal; MISS: none of it "
        "does; PARITY (within noise): it spans the goal, which is not a PASS.",
        "",
        "| goal (issue #14) | workload | time ratio | 95% interval | goal | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for g in bench["goals"]:
        limit = "" if g["goal"] is None else f"≤ {g['goal']:.2f}"
        (low, high), verdict = g["interval"], g["verdict"]
        lines.append(
            f"| {g['claim']} ({g['ratio_kind']}) | {g['workload']} | {g['ratio']:.3f} | {low:.3f}..{high:.3f} | "
            f"{limit} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


RENDERERS |= {"performance": render_performance, "recipe-seeds": render_recipe_seeds}


# --- bench/bench_fused_rule.py (issue #14): _fused.pays_off against the measured winner, per shape and ISA ---------

BENCH_OUTPUTS["fused-rule"] = "nice -n 10 python bench/bench_fused_rule.py --json docs/results/fused-rule.json"


def render_fused_rule(reports: Mapping[str, dict[str, Any]]) -> str:
    bench = reports["fused-rule"]
    runs, settings, load = bench["runs"], bench["settings"], bench["load_average"]
    isas = list(runs)
    lines = [
        f"`{BENCH_OUTPUTS['fused-rule']}`, {bench['date_utc']} UTC, {settings['repeats']} interleaved rounds per "
        f"shape, TF {next(iter(runs.values()))['threads']}; 1-minute load average {load['start']:.1f} at start, "
        f"{load['end']:.1f} at end. Runs: "
        + "; ".join(f"**{isa}**: {run['as_run']}" for isa, run in runs.items())
        + ". **These figures hold for this CPU only.**"
        + (" SMOKE RUN (fewer than 7 rounds): not a result." if settings["smoke"] else ""),
        "",
        "Cells: time fused / generic (median of per-round ratios), its 95% interval, the winner (tie: the interval "
        "spans 1) and the oneDNN kernel that served the fused path.",
        "",
        "| shape (NHWC or N×C) | what | rule says | " + " | ".join(isas) + " |",
        "|---|---|---|" + "---|" * len(isas),
    ]
    for label, purpose in bench["purpose"].items():
        rule = runs[isas[0]]["rows"][label]["rule"]
        cells = []
        for isa in isas:
            row = runs[isa]["rows"][label]
            mark = {True: "", False: " ✗", None: ""}[row["rule_agrees"]]
            cells.append(
                f"{row['ratio']:.2f} ({row['interval'][0]:.2f}..{row['interval'][1]:.2f}) "
                f"**{row['winner']}**{mark}, `{row['onednn_kernel']}`"
            )
        lines.append(f"| {label.replace('x', '×')} | {purpose} | {rule} | " + " | ".join(cells) + " |")
    lines.append("")
    for isa, run in runs.items():
        summary = run["summary"]
        lines.append(
            f"- {isa}: the rule agrees on {summary['agree']} of {summary['decided']} shapes with a measured winner "
            f"({summary['ties']} ties, where either path is as fast); ✗ marks where it picks the slower path."
        )
    return "\n".join(lines) + "\n"


RENDERERS["fused-rule"] = render_fused_rule


def render(readme: str, reports: Mapping[str, dict[str, Any]]) -> str:
    """README text with every generated block replaced by what the reports say; unknown block names are an error."""
    found = set()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise SystemExit(f"readme_tables: README.md has a block generated:{name} that no renderer knows")
        found.add(name)
        return match.group(1) + RENDERERS[name](reports) + match.group(4)

    text = _BLOCK.sub(replace, readme)
    missing = set(RENDERERS) - found
    if missing:
        raise SystemExit(f"readme_tables: README.md lacks the blocks {sorted(missing)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the reports say")
    args = parser.parse_args(argv)
    reports = {name: load_report(name) for name in (*REPORTS, *RECIPE_REPORTS, *BENCH_OUTPUTS)}
    current = README.read_text()
    wanted = render(current, reports)
    if args.check:
        if wanted != current:
            print("README.md is stale: run python tools/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
