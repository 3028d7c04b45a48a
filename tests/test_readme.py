"""README.md's claims that a script can check: generated figures match their reports; CI's commands are there."""

from __future__ import annotations

import importlib.util
import re
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
