"""README.md's claims that a script can check: generated figures match their reports; CI's commands are there."""

from __future__ import annotations

import importlib.util
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


# --- issue #14 (performance per mode): the generated block against its JSON ------------------------------------------
# The oracle recomputes every ratio from the raw per-round values with `statistics`, independently of
# bench/_timing.py, which produced the committed text.


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
        expected = "info" if goal["goal"] is None else ("PASS" if ratio <= goal["goal"] else "MISS")
        assert row[2:] == [f"{ratio:.3f}", "" if goal["goal"] is None else f"≤ {goal['goal']:.2f}", expected]
