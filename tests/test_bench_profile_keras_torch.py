"""bench/profile_keras_torch.py end to end in a subprocess (it fixes KERAS_BACKEND=torch before importing Keras).

Oracle for the counts: both variants' BN layers are called once per step per layer, so each probed layer shows up
once per variant; at 16 or more channels ours makes fewer ATen ops per BN call than Keras' layer by construction of
the torch path (torch_ref's autograd Function, the count known from x's shape), while bn1's 6 channels-last channels
are viewed as wider rows, which costs a few view and copy calls (spec.arrays' channel tiling). Nothing here asserts a
time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "profile_keras_torch.py"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workloads", "lenet,nope"], "--workloads takes a comma list of lenet, lenet-bn"),
        (["--rounds", "0"], "--batch, --steps, --rounds, --per-round and --threads must be positive"),
    ],
    ids=["unknown-workload", "zero-rounds"],
)
def test_profile_keras_torch_refuses_bad_flags_naming_them(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_profile_keras_torch_counts_each_bn_call_of_both_variants_and_names_the_cpu() -> None:
    command = [sys.executable, str(SCRIPT), "--workloads", "lenet-bn", "--batch", "4", "--steps", "1"]
    command += ["--rounds", "1", "--per-round", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith("machine: ") and "(torch backend)" in out
    layers = re.findall(
        r"^\s+(bn\d)\s+Python calls\s+([\d.]+) ->\s+([\d.]+)\s+ATen ops\s+([\d.]+) ->\s+([\d.]+)", out, re.M
    )
    assert [name for name, *_ in layers] == ["bn1", "bn2", "bn3", "bn4"]
    for name, _, _, keras_ops, ours_ops in layers:
        assert float(ours_ops) > 0 and float(keras_ops) > 0
        if name != "bn1":
            assert float(ours_ops) < float(keras_ops), name
