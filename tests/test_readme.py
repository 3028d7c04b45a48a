"""README.md's claims that a script can check: generated figures match their reports; CI's commands are there."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "tools" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_the_committed_reports():
    tables = _readme_tables()
    names = (*tables.REPORTS, *tables.RECIPE_REPORTS, *tables.BENCH_OUTPUTS)
    reports = {name: tables.load_report(name) for name in names}
    readme = (ROOT / "README.md").read_text()
    assert tables.render(readme, reports) == readme, "README.md is stale: run python tools/readme_tables.py"


def test_every_committed_report_names_its_machine_and_passed():
    tables = _readme_tables()
    for name in tables.REPORTS:
        report = tables.load_report(name)
        assert report["machine"]["cpu_model"], name
        assert report["agreement_passed"] is True, name


@pytest.mark.parametrize("marker", ["test-command", "slow-test-command"])
def test_ci_finds_each_documented_command(marker):
    # .ci/run reads the fenced line after each marker; the slow step must select exactly the slow tests.
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", readme)
    assert match, marker
    command = match.group(1)
    assert ("-m slow" in command) == (marker == "slow-test-command")


def test_the_default_run_deselects_slow_tests():
    # test_spec_onnx.py has one slow test (importing every ONNX node case); collection alone decides selection.
    # The slow step's `-m slow` replaces addopts' `-m "not slow"`: pytest keeps the last -m it is given.
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_spec_onnx.py"]
    collected = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "test_node_cases_are_those_of_load_node_model_tests" not in collected
    assert "1 deselected" in collected


# --- issue #12 (recipes over seeds) and #14 (performance per mode): the generated blocks against their JSON ---------
# The oracles recompute every figure from the raw per-seed / per-round values with `statistics`, independently of
# bench_recipes.summarize, bench/recipe_tables.py and bench/_timing.py, which produced the committed text.


def _block(readme: str, name: str) -> str:
    match = re.search(rf"<!-- BEGIN generated:{name} -->\n(.*?)<!-- END generated:{name} -->", readme, re.S)
    assert match, name
    return match.group(1)


def _tables(block: str) -> list[list[list[str]]]:
    """Each markdown table of a block as rows of cells, header and separator dropped."""
    tables, current = [], []
    for line in [*block.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current[2:])
            current = []
    return tables


_CELL = re.compile(r"(?P<mean>[\d.]+) ± (?P<sd>[\d.]+) \((?P<low>[\d.]+)\.\.(?P<high>[\d.]+)\)")


def test_recipe_seed_tables_state_mean_sd_and_range_over_the_seeds_of_the_json():
    tables = _readme_tables()
    rendered = _tables(_block((ROOT / "README.md").read_text(), "recipe-seeds"))
    assert len(rendered) == len(tables.RECIPE_SEEDS)
    for rows, recipe in zip(rendered, tables.RECIPE_SEEDS, strict=True):
        result = tables.load_report(tables.recipe_seeds_report(recipe))["results"][recipe]
        assert len(rows) == result["epochs"], recipe
        for epoch, row in enumerate(rows):
            assert row[0] == str(epoch + 1)
            for cell, entry in zip(row[1:], result["variants"].values(), strict=False):
                accuracies = [100 * run["val_accuracy"][epoch] for run in entry["runs"]]
                expected = {
                    "mean": statistics.fmean(accuracies),
                    "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "low": min(accuracies),
                    "high": max(accuracies),
                }
                shown = _CELL.fullmatch(cell)
                assert shown, (recipe, epoch, cell)
                for key, value in expected.items():
                    # printed with 2 decimals: half a unit of the last digit, plus float64 rounding of 100 * acc
                    assert abs(float(shown[key]) - value) <= 0.005 + 1e-9, (recipe, epoch + 1, key, cell)


def test_recipe_seed_blocks_name_their_figure_and_say_when_a_run_was_shortened():
    tables = _readme_tables()
    block = _block((ROOT / "README.md").read_text(), "recipe-seeds")
    parts = re.split(r"(?=^\*\*)", block, flags=re.M)[1:]
    assert len(parts) == len(tables.RECIPE_SEEDS)
    for part, recipe in zip(parts, tables.RECIPE_SEEDS, strict=True):
        result = tables.load_report(tables.recipe_seeds_report(recipe))["results"][recipe]
        assert f"]({tables.recipe_plot_path(recipe)})" in part, recipe
        assert (ROOT / tables.recipe_plot_path(recipe)).is_file(), recipe
        assert ("SMOKE RUN" in part) == (not result["full_length"]), recipe


def test_recipe_plots_draw_one_png_per_recipe(tmp_path):
    pytest.importorskip("matplotlib")
    command = [sys.executable, str(ROOT / "tools" / "recipe_plots.py"), "--out-dir", str(tmp_path)]
    subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    tables = _readme_tables()
    for recipe in tables.RECIPE_SEEDS:
        png = tmp_path / Path(tables.recipe_plot_path(recipe)).name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", recipe


def test_performance_goals_follow_from_the_recorded_timings():
    tables = _readme_tables()
    bench = tables.load_report("bench-modes")
    goal_rows = _tables(_block((ROOT / "README.md").read_text(), "performance"))[-1]
    assert len(goal_rows) == len(bench["goals"])
    for goal, row in zip(bench["goals"], goal_rows, strict=True):
        numerator = bench["seconds"][goal["workload"]][goal["numerator"]]
        denominator = bench["seconds"][goal["workload"]][goal["denominator"]]
        if goal["ratio_kind"] == "median of per-round ratios":
            ratio = statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
        else:
            ratio = statistics.median(numerator) / statistics.median(denominator)
        assert goal["ratio"] == pytest.approx(ratio, rel=1e-12), goal["claim"]
        paired = goal["ratio_kind"] == "median of per-round ratios"
        if paired:
            low, high = _order_statistic_interval([a / b for a, b in zip(numerator, denominator, strict=True)], 0.95)
        else:  # each median at sqrt(0.95), divided crosswise
            (a_low, a_high), (b_low, b_high) = (
                _order_statistic_interval(v, 0.95**0.5) for v in (numerator, denominator)
            )
            low, high = a_low / b_high, a_high / b_low
        if goal["goal"] is None:
            expected = "info"
        else:
            expected = "PASS" if high <= goal["goal"] else ("MISS" if low > goal["goal"] else "PARITY (within noise)")
        limit = "" if goal["goal"] is None else f"≤ {goal['goal']:.2f}"
        assert row[2:] == [f"{ratio:.3f}", f"{low:.3f}..{high:.3f}", limit, expected], goal["claim"]


def _order_statistic_interval(values: list[float], confidence: float) -> tuple[float, float]:
    """The k-th smallest and largest value, k the largest whose binomial coverage reaches ``confidence`` (1 if none)."""
    from scipy.stats import binom

    n, ordered = len(values), sorted(values)
    reaching = [k for k in range(1, (n + 1) // 2 + 1) if 1 - 2 * binom.cdf(k - 1, n, 0.5) >= confidence]
    k = max(reaching, default=1)
    return ordered[k - 1], ordered[n - k]


def test_fused_rule_table_follows_from_the_recorded_timings_and_the_current_rule():
    # Each cell's ratio, interval and winner recomputed from the per-round seconds; the rule column must be what
    # _fused.pays_off says today (a changed rule needs a new run of bench/bench_fused_rule.py).
    pytest.importorskip("tensorflow")
    from keras_bn import _fused

    tables = _readme_tables()
    bench = tables.load_report("fused-rule")
    block = _block((ROOT / "README.md").read_text(), "fused-rule")
    rows = _tables(block)[0]
    isas = list(bench["runs"])
    assert [row[0] for row in rows] == [label.replace("x", "×") for label in bench["purpose"]]
    agreement = {isa: [0, 0, 0] for isa in isas}  # agree, decided, ties
    for row, label in zip(rows, bench["purpose"], strict=True):
        shape = tuple(int(d) for d in label.split("x"))
        assert row[2] == ("fused" if _fused.pays_off(shape, -1) else "generic"), label
        for cell, isa in zip(row[3:], isas, strict=True):
            seconds = bench["runs"][isa]["shapes"][label]["seconds_per_call"]
            ratios = [a / b for a, b in zip(seconds["fused"], seconds["generic"], strict=True)]
            low, high = _order_statistic_interval(ratios, 0.95)
            winner = "fused" if high < 1 else ("generic" if low > 1 else "tie")
            expected = f"{statistics.median(ratios):.2f} ({low:.2f}..{high:.2f}) **{winner}**"
            assert cell.startswith(expected), (label, isa, cell)
            assert cell.startswith(expected + " ✗,") == (winner not in ("tie", row[2])), (label, isa, cell)
            counts = agreement[isa]
            counts[2] += winner == "tie"
            counts[1] += winner != "tie"
            counts[0] += winner == row[2]
    for isa, (agree, decided, ties) in agreement.items():
        assert f"- {isa}: the rule agrees on {agree} of {decided} shapes with a measured winner ({ties} ties" in block


@pytest.mark.parametrize(
    ("report", "claim", "quoted"),
    [
        ("bench-modes-avx2.json", "ours / Keras' layer, tf.function", "0.922, interval 0.859..1.001"),
        ("bench-modes-avx2.json", "TF ours (tf.function) / torch.nn.BatchNorm2d", "2.06x `torch.nn`"),
        ("bench-modes-avx2-measure.json", "ours / Keras' layer, tf.function", "0.670 (0.634..0.751)"),
        ("bench-modes-avx2-measure.json", "TF ours (tf.function) / torch.nn.BatchNorm2d", "1.05 (0.999..1.339)"),
        ("bench-modes-avx2-xla.json", "TF ours (tf xla) / torch.nn.BatchNorm2d", "0.722 (0.629..0.780)"),
        ("bench-modes-avx2-xla.json", "ours / Keras' layer, tf xla", "0.341 (0.309..0.370)"),
    ],
    ids=[
        "avx2-rule-vs-keras",
        "avx2-rule-vs-aten",
        "avx2-measure-vs-keras",
        "avx2-measure-vs-aten",
        "avx2-xla-vs-aten",
        "avx2-xla-vs-keras",
    ],
)
def test_avx2_figures_quoted_in_prose_are_the_committed_runs(report, claim, quoted):
    """The fused-rule paragraph quotes three --isa avx2 runs by number: each figure must be its JSON's, rounded."""
    bench = json.loads((ROOT / "docs" / "results" / report).read_text())
    assert bench["isa"]["isa"] == "avx2"
    (goal,) = [g for g in bench["goals"] if g["claim"] == claim and g["workload"] == "layer"]
    numbers = [float(n) for n in re.findall(r"\d+\.\d+", quoted)]
    assert numbers[0] == pytest.approx(goal["ratio"], abs=0.006)
    if len(numbers) == 3:
        assert numbers[1:] == pytest.approx(goal["interval"], abs=0.0006)
    assert quoted in " ".join((ROOT / "README.md").read_text().split())
