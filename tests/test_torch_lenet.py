"""torch_ref.lenet_bn: the architecture of keras_bn.lenet_bn, with our BN or torch.nn's, checkpoints interchangeable."""

from __future__ import annotations

import pytest
import torch

import torch_ref

SUBMODULES = ["conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "fc2", "bn4", "fc3"]


@pytest.mark.parametrize(
    "batch_norm, params, stats",
    [("ours", 44_878, 452), ("torch", 44_878, 452), (None, 44_426, 0)],
    ids=["ours", "torch.nn", "no-bn"],
)
def test_parameter_counts_match_keras_lenet(batch_norm: str | None, params: int, stats: int) -> None:
    """Counts from the Keras model's summary (HELPERS.md): 44,878 trainable + 452 moving statistics with BN."""
    model = torch_ref.lenet_bn(batch_norm)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for b in model.buffers() if b.is_floating_point()) == stats
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    assert names == [n for n in SUBMODULES if batch_norm is not None or not n.startswith("bn")]


@pytest.mark.parametrize("batch_norm", ["ours", "torch", None], ids=["ours", "torch.nn", "no-bn"])
def test_forward_shape_and_nchw_input(batch_norm: str | None) -> None:
    model = torch_ref.lenet_bn(batch_norm, seed=0)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(RuntimeError):  # NHWC by mistake: conv1 expects 1 input channel
        model(torch.zeros(3, 28, 28, 1))


def test_ours_and_torch_checkpoints_are_interchangeable() -> None:
    """Same seed gives the same init; a state_dict of one loads strictly into the other, same outputs."""
    ours, peer = torch_ref.lenet_bn("ours", seed=3), torch_ref.lenet_bn("torch", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), peer.state_dict().values(), strict=True))
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ours(x)  # one training step moves ours' running statistics away from peer's
    peer.load_state_dict(ours.state_dict())
    ours.eval()
    peer.eval()
    with torch.no_grad():
        y_ours, y_peer = ours(x), peer(x)
    # float32, same weights, two BN implementations: the BN tests bound each layer at 1e-5 relative.
    assert float((y_ours - y_peer).abs().max()) <= 1e-5 * max(1.0, float(y_peer.abs().max()))


def test_momentum_and_eps_reach_every_bn() -> None:
    model = torch_ref.lenet_bn("ours", momentum=None, eps=1e-3)
    bns = [m for m in model.modules() if isinstance(m, torch_ref.BatchNorm1d | torch_ref.BatchNorm2d)]
    assert len(bns) == 4 and all(m.momentum is None and m.eps == 1e-3 for m in bns)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"batch_norm": "keras"}, "batch_norm"), ({"num_classes": 0}, "num_classes")],
    ids=["batch_norm", "num_classes"],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        torch_ref.lenet_bn(**kwargs)
