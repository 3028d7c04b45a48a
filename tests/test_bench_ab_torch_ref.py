"""bench/ab_torch_ref.py: torch_ref at a git revision against the working tree, in one process (no time is judged).

Oracle: an A/A comparison (the revision's file is the working tree's own when nothing is changed, and in any case
both versions start from the same state) and the counts the arguments ask for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ab_torch_ref  # noqa: E402

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="compares against git history: a checkout only")


@pytest.mark.parametrize("workload", ["6x3", "4x3x2x2", "lenet"])
def test_both_versions_step_from_the_same_state_for_every_pair(workload: str, capsys) -> None:
    argv = ["--rev", "HEAD", "--pairs", "4", "--warmup", "1", "--threads", "1", "--workload", workload, "--batch", "4"]
    result = ab_torch_ref.compare(ab_torch_ref._parse(argv))
    assert set(result["seconds"]) == {"rev", "tree"} and all(len(s) == 4 for s in result["seconds"].values())
    low, high = result["interval"]
    assert low <= result["ratio"] <= high
    # HEAD's file and the tree's compute the same formulas on the same data unless the tree changed torch_ref's
    # batch_norm.py: the A/A case the method's bias is measured with
    unchanged = ab_torch_ref.subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "torch_ref/batch_norm.py"], cwd=ROOT, check=False
    )
    if unchanged.returncode == 0:
        assert result["same_outputs"]


def test_unknown_revision_exits_naming_it() -> None:
    with pytest.raises(SystemExit, match="no torch_ref/batch_norm.py at 'no-such-rev'"):
        ab_torch_ref.module_at("no-such-rev")


@pytest.mark.parametrize("argv", [["--workload", "8xq"], ["--workload", "8"], ["--pairs", "0"]], ids=str)
def test_bad_arguments_are_usage_errors_naming_the_flag(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ab_torch_ref._parse(argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
