"""bench/profile_torch_bn.py's split of a step's ATen ops into x-sized passes and per-channel ops.

Oracle: steps made of ops whose kind is known by construction (nothing here asserts a time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torch_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import profile_torch_bn  # noqa: E402

X = torch.ones(8, 3, 4, 4)  # 384 values: x-sized
PER_CHANNEL = torch.ones(1, 3, 1, 1)

# step -> (x-sized ops, per-channel ops) per call, top-level ATen calls only
KNOWN_STEPS = {
    "one-pass": (lambda: X * 2.0, (1, 0)),
    "per-channel-only": (lambda: (PER_CHANNEL + 1.0).rsqrt(), (0, 2)),
    "broadcast-pass-and-reduction": (lambda: (X - PER_CHANNEL).sum(dim=(0, 2, 3)), (2, 0)),
    "mixed": (lambda: X.mul(PER_CHANNEL.sqrt()), (1, 1)),
}


@pytest.mark.parametrize("step_id", list(KNOWN_STEPS))
def test_split_counts_each_top_level_op_once_by_the_size_of_its_inputs(step_id: str) -> None:
    step, (x_sized, per_channel) = KNOWN_STEPS[step_id]
    split = profile_torch_bn.split_step(step, X.numel(), steps=3)
    assert split["x_sized"][0] == x_sized and split["per_channel"][0] == per_channel


def test_torch_ref_makes_more_passes_and_per_channel_ops_than_torch_nn_per_step() -> None:
    """The comparison the lenet-bn table prints: torch.nn's step is two ATen kernels over x (native_batch_norm and
    its backward); torch_ref's is spec's passes (moments, normalize, the coefficient-form backward)."""
    shape = (4, 3, 2, 2)
    counts = {}
    for package in (torch.nn, torch_ref):
        split = profile_torch_bn.split_step(
            profile_torch_bn.layer_step(profile_torch_bn.batch_norm_class(package, shape), shape), 48, 2
        )
        counts[package.__name__] = split
    assert counts["torch.nn"]["x_sized"][0] == 2
    assert (
        counts["torch_ref"]["x_sized"][0] > 2
        and counts["torch_ref"]["per_channel"][0] > counts["torch.nn"]["per_channel"][0]
    )
