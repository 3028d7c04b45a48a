"""bench/bench_fused_rule.py's reading of oneDNN's log and its verdicts, on fixed text and hand-made timings."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_fused_rule  # noqa: E402  (bench/bench_fused_rule.py)


def test_onednn_kernels_are_read_per_shape_from_the_verbose_log():
    log = textwrap.dedent(
        """
        SHAPE 64x24x24x6
        onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind
        onednn_verbose,v1,primitive,exec,cpu,batch_normalization,nspc_bnorm:any,forward_training,data:f32,,mb64ic6
        onednn_verbose,v1,primitive,exec,cpu,batch_normalization,nspc_bnorm:any,backward,data:f32,,mb64ic6
        SHAPE 64x120
        onednn_verbose,v1,primitive,exec,cpu,batch_normalization,bnorm_tbb_jit:avx2,forward_training,data:f32
        SHAPE 64x84
        """
    )
    assert bench_fused_rule.onednn_kernels(log) == {"64x24x24x6": "nspc_bnorm:any", "64x120": "bnorm_tbb_jit:avx2"}


def test_the_rule_is_judged_only_on_shapes_whose_winner_is_outside_the_noise():
    rounds = 7  # 95% interval of 7 per-round ratios: their min..max (tests/test_bench_timing.py)
    shapes = {
        # fused / generic per round: all < 1, all > 1, spanning 1
        "fused-wins": (True, [0.5, 0.6, 0.55, 0.52, 0.58, 0.57, 0.51]),
        "generic-wins": (True, [1.3, 1.2, 1.25, 1.4, 1.22, 1.21, 1.3]),
        "tie": (False, [0.95, 1.02, 1.0, 0.99, 1.05, 0.97, 1.01]),
        "generic-right": (False, [1.5, 1.6, 1.55, 1.52, 1.58, 1.57, 1.51]),
    }
    timed = {
        label: {
            "rule_says_fused": rule,
            "seconds_per_call": {"fused": [r * 1e-3 for r in ratios], "generic": [1e-3] * rounds},
        }
        for label, (rule, ratios) in shapes.items()
    }
    result = bench_fused_rule.compare(timed)
    rows = result["rows"]
    assert [rows[label]["winner"] for label in shapes] == ["fused", "generic", "tie", "generic"]
    assert [rows[label]["rule_agrees"] for label in shapes] == [True, False, None, True]
    assert rows["tie"]["interval"] == pytest.approx([0.95, 1.05])
    assert result["summary"] == {"shapes": 4, "decided": 3, "agree": 2, "ties": 1}


@pytest.mark.slow
def test_a_tiny_sweep_records_each_isa_its_kernels_and_the_rule(tmp_path):
    out = tmp_path / "fused-rule.json"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "bench" / "bench_fused_rule.py"), "--shapes", "8x4x4x16,8x4x4x6,8x16"]
    command += ["--repeats", "2", "--warmup", "1", "--target-ms", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["smoke"] is True and "SMOKE RUN" in done.stdout
    assert list(report["runs"]) == ["native", "avx2"]
    above_avx2 = "avx512f" in report["machine"]["vector_extensions"]
    for isa, run in report["runs"].items():
        kernels = {label: row["onednn_kernel"] for label, row in run["rows"].items()}
        # oneDNN's reference loop for 6 channels; for 16, the widest JIT kernel the (capped) ISA allows
        widest = "avx512_core" if isa == "native" and above_avx2 else "avx2"
        if platform.machine() == "x86_64":
            assert kernels == {
                "8x4x4x16": f"bnorm_tbb_jit:{widest}",
                "8x4x4x6": "nspc_bnorm:any",
                "8x16": f"bnorm_tbb_jit:{widest}",
            }
        assert [row["rule"] for row in run["rows"].values()] == ["fused", "generic", "generic"]
        assert ("capped to AVX2" in run["as_run"]) == (isa == "avx2" and above_avx2)
        for row in run["rows"].values():
            assert row["interval_coverage"] == 0.5  # 2 rounds: the range of the two ratios
