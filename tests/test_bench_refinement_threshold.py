"""bench/bench_refinement_threshold.py end to end at tiny sizes: every (shape, mode) row, its verdict and the rule's
prediction come out of one run (no timing is judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_refinement_threshold.py"


@pytest.mark.slow
def test_refinement_threshold_bench_times_both_traces_per_shape_and_mode_and_states_the_rule(tmp_path):
    out = tmp_path / "refinement.json"
    # 16x16x16x16 has 2**16 values: the smallest shape the layer refines conditionally (keras_bn/layer.py)
    command = [sys.executable, str(SCRIPT), "--shapes", "4x8,16x16x16x16", "--repeats", "2", "--steps", "1"]
    command += ["--warmup", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_model"] and result["machine_as_run"] in done.stdout
    assert "SMOKE RUN" in done.stdout  # 2 rounds are not a result
    rows = {(tuple(r["shape"]), r["mode"]): r for r in result["rows"]}
    modes = ("tf.function", "tf xla", "jax jit")
    assert set(rows) == {(shape, mode) for shape in ((4, 8), (16, 16, 16, 16)) for mode in modes}
    for (shape, _), row in rows.items():
        assert row["threshold"] == 2**16
        assert row["rule"] == ("conditional" if shape == (16, 16, 16, 16) else "unconditional")
        low, high = row["interval"]
        assert low <= row["ratio"] <= high
        assert row["winner"] == ("conditional" if high < 1 else "unconditional" if low > 1 else "tie")


@pytest.mark.parametrize("shapes", ["64x", "64", "0x8"], ids=["not-a-number", "rank-1", "zero"])
def test_refinement_threshold_bench_refuses_bad_shapes_naming_the_flag(shapes):
    """A usage error (argparse's exit 2) naming --shapes, before any child process starts."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--shapes", shapes], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--shapes takes a comma list of shapes" in done.stderr
