"""bench/bench_modes.py end to end at a tiny size: the table and its goals come out of one run (no timing is judged)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_modes_assembles_every_tensorflow_row_and_its_goals_from_a_child_process(tmp_path):
    out = tmp_path / "modes.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_modes.py"), "--backends", "tensorflow"]
    command += ["--shape", "2,3,3,4", "--batch", "4", "--lenet-steps", "1", "--repeats", "2", "--warmup", "1"]
    command += ["--bandwidth-mib", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_model"]
    assert result["settings"]["smoke"] is True and "SMOKE RUN" in done.stdout  # 2 rounds are not a result
    modes = {(r["workload"], r["mode"], r["variant"]) for r in result["rows"]}
    expected = {(w, m, v) for w in ("layer", "lenet") for m in ("tf.function", "tf xla") for v in ("keras", "ours")}
    assert modes == expected
    assert result["layer_bytes_moved"] == 8 * 2 * 3 * 3 * 4 * 4  # 8 passes over the float32 batch (docstring)
    # Without the torch child only the ours-vs-Keras goals exist; each is the median of its per-round ratios.
    assert [g["claim"] for g in result["goals"]] == [
        f"ours / Keras' layer, {mode}" for _ in ("layer", "lenet") for mode in ("tf.function", "tf xla")
    ]
    for goal in result["goals"]:
        seconds = result["seconds"][goal["workload"]]
        ratios = [a / b for a, b in zip(seconds[goal["numerator"]], seconds[goal["denominator"]], strict=True)]
        assert goal["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert goal["verdict"] == ("PASS" if goal["ratio"] <= 1.0 else "MISS")


@pytest.mark.parametrize("workloads", ["lenet,nope", ""], ids=["unknown", "empty"])
def test_bench_modes_refuses_unknown_workloads_naming_the_flag(workloads):
    """A usage error (argparse's exit 2) naming --workloads, before any child process starts."""
    command = [sys.executable, str(ROOT / "bench" / "bench_modes.py"), "--workloads", workloads]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "--workloads takes a comma list of layer, lenet" in done.stderr
