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
            profile_torch_bn.torch_batch_norm_step(profile_torch_bn.torch_batch_norm_class(package, shape), shape),
            48,
            2,
        )
        counts[package.__name__] = split
    assert counts["torch.nn"]["x_sized"][0] == 2
    assert (
        counts["torch_ref"]["x_sized"][0] > 2
        and counts["torch_ref"]["per_channel"][0] > counts["torch.nn"]["per_channel"][0]
    )


def test_replayed_ops_take_their_kinds_from_the_op_by_op_step() -> None:
    """torch_ref's replayed step is classified by the same ATen ops issued op by op (TorchScript's records list
    stale extra input shapes): the kinds, and so the counts, must equal the op-by-op step's own; a reference
    issuing other ops is refused."""
    shape = (8, 16, 4, 8)  # NCHW whose last dim (8) is below spec.arrays' tiling width: no views made for it
    replayed = profile_torch_bn.torch_batch_norm_step(profile_torch_bn.torch_batch_norm_class(torch_ref, shape), shape)
    op_by_op = profile_torch_bn.op_by_op(replayed)
    numel = 8 * 16 * 4 * 8
    borrowed = profile_torch_bn.split_step(replayed, numel, steps=2, reference=op_by_op)
    own = profile_torch_bn.split_step(op_by_op, numel, steps=2)
    assert [borrowed[k][0] for k in ("x_sized", "per_channel")] == [own[k][0] for k in ("x_sized", "per_channel")]
    # forward 8 passes (3 sums, x - shift twice, the square, the affine map's 2), backward 8 (2 sums, x - mean
    # twice, the product, dx's 3)
    assert borrowed["x_sized"][0] == 16
    with pytest.raises(RuntimeError, match="other ATen ops"):
        profile_torch_bn.split_step(replayed, numel, steps=2, reference=lambda: X * 2.0)
