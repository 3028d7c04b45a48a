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
def test_bench_modes_assembles_every_tensorflow_row_and_its_goals_from_a_capped_child_process(tmp_path):
    out = tmp_path / "modes.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_modes.py"), "--backends", "tensorflow"]
    command += ["--shape", "2,3,3,4", "--batch", "4", "--lenet-steps", "1", "--repeats", "2", "--warmup", "1"]
    command += ["--lenet-repeats", "2"]
    command += ["--bandwidth-mib", "1", "--isa", "avx2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_model"]
    # The cap is recorded and named, never passed off as another machine (bench/_isa.py).
    assert result["isa"]["variables"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    above_avx2 = {"avx512f", "amx_tile"} & set(result["machine"]["vector_extensions"])
    assert ("capped to AVX2 by ONEDNN_MAX_CPU_ISA=AVX2" in result["machine_as_run"]) == bool(above_avx2)
    assert result["machine_as_run"] in done.stdout
    assert result["settings"]["smoke"] is True and "SMOKE RUN" in done.stdout  # 2 rounds are not a result
    # The default allocator: the child's malloc got glibc's largest mmap threshold and no trimming (bench_modes,
    # "Allocator"); the parent records what the child saw, and prints it
    steady = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
    assert result["allocator"]["name"] == "steady" and result["allocator"]["variables"] == steady
    assert result["allocator"]["seen_by_children"] == {"tensorflow": steady}
    assert "allocator: steady (MALLOC_MMAP_THRESHOLD_=33554432" in done.stdout
    modes = {(r["workload"], r["mode"], r["variant"]) for r in result["rows"]}
    workloads = ("layer", "lenet-bn", "lenet")
    expected = {(w, m, v) for w in workloads for m in ("tf.function", "tf xla") for v in ("keras", "ours")}
    assert modes == expected
    assert result["layer_bytes_moved"] == 8 * 2 * 3 * 3 * 4 * 4  # 8 passes over the float32 batch (docstring)
    # LeNet-BN's BN layers at batch 4: after conv1 (28-5+1=24, 6 maps), conv2 after pooling ((12-5+1)=8, 16 maps)
    # and the two hidden Dense layers (keras_bn/model.py's architecture, derived by hand)
    assert result["lenet_bn_shapes"] == [[4, 24, 24, 6], [4, 8, 8, 16], [4, 120], [4, 84]]
    assert result["lenet_bn_bytes_moved"] == 8 * 4 * 4 * (24 * 24 * 6 + 8 * 8 * 16 + 120 + 84)
    # BN's estimated share of each LeNet step: its four layers alone over the whole step, same mode and variant
    medians = {(r["workload"], r["mode"], r["variant"]): r["median_ms"] for r in result["rows"]}
    for r in (r for r in result["rows"] if r["workload"] == "lenet"):
        alone = medians["lenet-bn", r["mode"], r["variant"]]
        assert r["bn_alone_share"] == pytest.approx(alone / r["median_ms"], rel=1e-12)
    # Minor page faults per step: the median over the timed calls of the raw counts, per step of the call
    per_call = {"layer": 1, "lenet-bn": 1, "lenet": 1}  # --lenet-steps 1
    for r in result["rows"]:
        counts = result["minor_faults"][r["workload"]][f"{r['mode']}|{r['variant']}"]
        assert len(counts) == 2 and all(isinstance(c, int) and c >= 0 for c in counts)
        assert r["minor_faults_per_step"] == statistics.median(counts) / per_call[r["workload"]]
    assert "faults" in done.stdout
    # Without the torch child only the ours-vs-Keras goals exist; each is the median of its per-round ratios.
    assert [g["claim"] for g in result["goals"]] == [
        f"ours / Keras' layer, {mode}" for _ in workloads for mode in ("tf.function", "tf xla")
    ]
    for goal in result["goals"]:
        seconds = result["seconds"][goal["workload"]]
        ratios = [a / b for a, b in zip(seconds[goal["numerator"]], seconds[goal["denominator"]], strict=True)]
        assert goal["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        # 2 rounds: no order statistic reaches 95% coverage, so the interval is the whole range of the ratios
        assert goal["interval"] == [min(ratios), max(ratios)] and goal["interval_coverage"] == 0.5
        low, high = goal["interval"]
        assert goal["verdict"] == ("PASS" if high <= 1.0 else "MISS" if low > 1.0 else "PARITY (within noise)")


@pytest.mark.parametrize("workloads", ["lenet,nope", ""], ids=["unknown", "empty"])
def test_bench_modes_refuses_unknown_workloads_naming_the_flag(workloads):
    """A usage error (argparse's exit 2) naming --workloads, before any child process starts."""
    command = [sys.executable, str(ROOT / "bench" / "bench_modes.py"), "--workloads", workloads]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "--workloads takes a comma list of layer, lenet-bn, lenet" in done.stderr
