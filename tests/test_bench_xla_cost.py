"""bench/xla_cost.py's reading of an optimized HLO module (``program``), against a hand-written module whose
counts are derived by hand below; and its command line. Nothing is compiled or timed here (the compiled LeNet
step is read in tests/test_layer_xla.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from xla_cost import passes, program  # noqa: E402  (bench/ is not a package)

# The sum reducer and one level of XLA:CPU's reduce-window tree over (rows, 8), shared by the modules below.
_ADD = """%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
"""


def _tree_level(name: str, rows: int, window: int = 32) -> str:
    """A computation summing a (rows, 8) float32 parameter in windows of ``window`` rows."""
    out = rows // window
    return f"""%{name} (p: f32[{rows},8], z: f32[]) -> f32[{out},8] {{
  %p = f32[{rows},8]{{1,0}} parameter(0)
  %z = f32[] parameter(1)
  ROOT %w = f32[{out},8]{{1,0}} reduce-window(%p, %z), window={{size={window}x1 stride={window}x1}}, to_apply=%add
}}
"""


# Shaped as XLA:CPU prints an optimized module (TF 2.21): layouts, metadata, a YNNPACK fusion's backend_config,
# a multi-output fusion with a tuple shape and an /*index=N*/ comment, a conditional with its branches.
_MODULE = (
    """HloModule hand_written, entry_computation_layout={(f32[64,8]{1,0})->f32[8]{0}}

"""
    + _ADD
    + _tree_level("tree_sum", 64)
    + """
%max (a.1: f32[], b.1: f32[]) -> f32[] {
  %a.1 = f32[] parameter(0)
  %b.1 = f32[] parameter(1)
  ROOT %maximum = f32[] maximum(%a.1, %b.1)
}

%ynn_sum (p.0: f32[64,8], z.0: f32[]) -> f32[8] {
  %p.0 = f32[64,8]{1,0} parameter(0)
  %z.0 = f32[] parameter(1)
  ROOT %reduce.0 = f32[8]{0} reduce(%p.0, %z.0), dimensions={0}, to_apply=%add
}

%pool (p.2: f32[64,8], z.2: f32[]) -> f32[32,8] {
  %p.2 = f32[64,8]{1,0} parameter(0)
  %z.2 = f32[] parameter(1)
  ROOT %window.2 = f32[32,8]{1,0} reduce-window(%p.2, %z.2), window={size=2x1 stride=2x1}, to_apply=%max
}

%square_and_copy (p.3: f32[64,8]) -> (f32[64,8], f32[64,8]) {
  %p.3 = f32[64,8]{1,0} parameter(0)
  %square.3 = f32[64,8]{1,0} multiply(%p.3, %p.3)
  ROOT %pair.3 = (f32[64,8]{1,0}, f32[64,8]{1,0}) tuple(%square.3, %p.3)
}

%taken (t.4: (f32[64,8])) -> (f32[8]) {
  %t.4 = (f32[64,8]{1,0}) parameter(0)
  %x.4 = f32[64,8]{1,0} get-tuple-element(%t.4), index=0
  %zero.4 = f32[] constant(0)
  %sum.4 = f32[8]{0} fusion(%x.4, %zero.4), kind=kLoop, calls=%ynn_sum
  ROOT %out.4 = (f32[8]{0}) tuple(%sum.4)
}

%skipped (t.5: (f32[64,8])) -> (f32[8]) {
  %t.5 = (f32[64,8]{1,0}) parameter(0)
  %zeros.5 = f32[8]{0} constant({0, 0, 0, 0, 0, 0, 0, 0})
  ROOT %out.5 = (f32[8]{0}) tuple(%zeros.5)
}

ENTRY %main.9 (x: f32[64,8]) -> f32[8] {
  %x = f32[64,8]{1,0} parameter(0), metadata={op_name="XLA_Args"}
  %zero = f32[] constant(0)
  %sum = f32[8]{0} fusion(%x, %zero), kind=kCustom, calls=%ynn_sum, backend_config={"kind":"__ynn_fusion"}
  %partial = f32[2,8]{1,0} fusion(%x, %zero), kind=kLoop, calls=%tree_sum
  %pooled = f32[32,8]{1,0} fusion(%x, %zero), kind=kLoop, calls=%pool
  %both = (f32[64,8]{1,0}, /*index=1*/f32[64,8]{1,0}) fusion(%x), kind=kLoop, calls=%square_and_copy
  %flag = pred[] constant(false)
  %operand = (f32[64,8]{1,0}) tuple(%x)
  %cond = (f32[8]{0}) conditional(%flag, %operand, %operand), true_computation=%taken, false_computation=%skipped
  %picked = f32[8]{0} get-tuple-element(%cond), index=0
  ROOT %copy = f32[8]{0} copy(%picked)
}
"""
)


def test_program_counts_kernels_bytes_branches_and_reductions_of_a_hand_written_module():
    """Hand-derived: x is 64x8 float32 = 2048 B, a per-channel vector 32 B, a scalar 4 B, the predicate 1 B.

    Top-level kernels: sum (2048 + 4 read, 32 written), partial (2052 + 64), pooled (2052 + 1024), both (2048 +
    2 * 2048), cond (predicate 1 + result 32: its operand is passed to the branches), copy (32 + 32): 6 kernels,
    13,517 B. Branches: ``taken`` runs one fusion (2048 + 4 + 32), ``skipped`` none. One sum runs by YNNPACK,
    one as a reduce-window tree; the max pooling window is not a sum.
    """
    found = program(_MODULE)
    assert found == {
        "kernels": 6,
        "bytes": 2084 + 2116 + 3076 + 6144 + 33 + 64,
        "conditionals": 1,
        "branch_kernels": 1,
        "branch_bytes": 2084,
        "while_loops": 0,
        "custom_calls": 0,
        "host_transfers": 0,
        "ynn_reductions": 1,
        "loop_reductions": 1,
    }
    assert found["bytes"] == 13517


@pytest.mark.parametrize(
    "argv", [["--workload", "resnet"], ["--workload", "lenet", "--batch", "0"]], ids=["workload", "batch"]
)
def test_xla_cost_refuses_bad_arguments_naming_the_flag(argv):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "xla_cost.py"), *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert argv[-2] in done.stderr and "Traceback" not in done.stderr


# For ``passes``: bare kernels (no fusion), an x-sized operand of another shape, a multi-output fusion's two results.
_PASSES_MODULE = (
    """HloModule passes_by_hand, entry_computation_layout={(f32[64,8]{1,0}, f32[512]{0})->f32[8]{0}}

"""
    + _ADD
    + _tree_level("tree_sum", 64)
    + """
%square_and_copy (p.3: f32[64,8]) -> (f32[64,8], f32[64,8]) {
  %p.3 = f32[64,8]{1,0} parameter(0)
  %square.3 = f32[64,8]{1,0} multiply(%p.3, %p.3)
  ROOT %pair.3 = (f32[64,8]{1,0}, f32[64,8]{1,0}) tuple(%square.3, %p.3)
}

ENTRY %main.2 (x: f32[64,8], d: f32[512]) -> f32[8] {
  %x = f32[64,8]{1,0} parameter(0)
  %d = f32[512]{0} parameter(1)
  %zero = f32[] constant(0)
  %product = f32[512]{0} multiply(%d, %d)
  %windowed = f32[16]{0} reduce-window(%product, %zero), window={size=32 stride=32}, to_apply=%add
  %partial = f32[2,8]{1,0} fusion(%x, %zero), kind=kLoop, calls=%tree_sum
  %both = (f32[64,8]{1,0}, /*index=1*/f32[64,8]{1,0}) fusion(%x), kind=kLoop, calls=%square_and_copy
  ROOT %copy = f32[16]{0} copy(%windowed)
}
"""
)


def test_passes_counts_bare_kernels_reshaped_batches_and_tuple_results_of_a_hand_written_module():
    """Hand-derived, x = f32[64,8] (2048 B): ``d`` (f32[512]) is x-sized too. Kernels: product (reads d once though
    it is named twice, writes 1), windowed (reads the product; window 32), partial (reads x; window 32x1), both (reads
    x, writes 2 arrays), copy (nothing x-sized): 5 kernels, 4 reads, 3 writes; no conditional."""
    found = passes(_PASSES_MODULE, "f32[64,8]")
    assert found == {
        "fusions": 5,
        "reads": 4,
        "writes": 3,
        "conditionals": 0,
        "branch_reads": 0,
        "branch_writes": 0,
        "windows": ["32", "32x1"],
    }


def test_program_counts_a_tree_of_two_levels_as_one_sum():
    """A sum over 2048 rows: XLA:CPU's first level windows 32 rows (64 partial sums), its second 32 more (2), a final
    reduce ends it: one sum, three kernels."""
    module = (
        """HloModule two_levels, entry_computation_layout={(f32[2048,8]{1,0})->f32[8]{0}}

"""
        + _ADD
        + _tree_level("level_1", 2048)
        + _tree_level("level_2", 64)
        + """
%last (p.3: f32[2,8], z.3: f32[]) -> f32[8] {
  %p.3 = f32[2,8]{1,0} parameter(0)
  %z.3 = f32[] parameter(1)
  ROOT %reduce.3 = f32[8]{0} reduce(%p.3, %z.3), dimensions={0}, to_apply=%add
}

ENTRY %main.3 (x: f32[2048,8]) -> f32[8] {
  %x = f32[2048,8]{1,0} parameter(0)
  %zero = f32[] constant(0)
  %first = f32[64,8]{1,0} fusion(%x, %zero), kind=kLoop, calls=%level_1
  %second = f32[2,8]{1,0} fusion(%first, %zero), kind=kLoop, calls=%level_2
  ROOT %total = f32[8]{0} fusion(%second, %zero), kind=kLoop, calls=%last
}
"""
    )
    found = program(module)
    assert (found["kernels"], found["loop_reductions"], found["ynn_reductions"]) == (3, 1, 0), found
