"""torch_ref.BatchNorm*d(convention=...): the running statistics of each framework's own update rule.

Oracle: each framework's recurrence written out by hand from its source (SPEC.md §5 cites them),
not spec's functions: Keras/ONNX/TF1 weight the old value by (1 - torch momentum), torch and d2l
the new value by the momentum, Caffe keeps unnormalized sums and a scale factor (blob = f * blob +
stat, s = f * s + 1, stored statistic = blob / s). Unbiased conventions feed var * m / (m - 1).
float64 throughout: both sides are a few exact double operations per step, so 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch

import torch_ref

MOMENTUM = 0.3  # PyTorch's meaning: the weight of the new batch
SHAPE = (6, 3, 4, 5)  # m = 120 values per channel
STEPS = 3
# convention -> (form, variance fed in): form "old"/"new" as above, "caffe" the scale-factor sums
HAND_RULES = {
    "torch": ("new", "unbiased"),
    "d2l": ("new", "biased"),
    "keras": ("old", "biased"),
    "onnx": ("old", "biased"),
    "tf1": ("old", "unbiased"),
    "caffe": ("caffe", "unbiased"),
}


def _hand_running_stats(convention: str, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    form, variance = HAND_RULES[convention]
    mean, var = torch.zeros(SHAPE[1], dtype=torch.float64), torch.ones(SHAPE[1], dtype=torch.float64)
    blob_mean, blob_var, scale = torch.zeros_like(mean), torch.zeros_like(var), 0.0
    for x in batches:
        m = x.numel() // x.shape[1]
        batch_mean = x.mean(dim=(0, 2, 3))
        batch_var = ((x - batch_mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        if variance == "unbiased":
            batch_var = batch_var * m / (m - 1)
        if form == "new":  # torch/d2l: (1 - momentum) * old + momentum * batch
            mean, var = (1 - MOMENTUM) * mean + MOMENTUM * batch_mean, (1 - MOMENTUM) * var + MOMENTUM * batch_var
        elif form == "old":  # Keras' momentum = 1 - torch's: keras_momentum * old + (1 - keras_momentum) * batch
            keras_momentum = 1 - MOMENTUM
            mean = keras_momentum * mean + (1 - keras_momentum) * batch_mean
            var = keras_momentum * var + (1 - keras_momentum) * batch_var
        else:  # Caffe's moving_average_fraction f = 1 - torch's momentum; its blobs start at 0
            f = 1 - MOMENTUM
            blob_mean, blob_var, scale = f * blob_mean + batch_mean, f * blob_var + batch_var, f * scale + 1
            mean, var = blob_mean / scale, blob_var / scale
    return mean, var


@pytest.mark.parametrize("convention", list(HAND_RULES))
def test_running_statistics_follow_the_convention(convention: str) -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(STEPS)]
    bn = torch_ref.BatchNorm2d(SHAPE[1], momentum=MOMENTUM, convention=convention, dtype=torch.float64)
    for x in batches:
        bn(x)
    mean, var = _hand_running_stats(convention, batches)
    for name, ours, hand in (("running_mean", bn.running_mean, mean), ("running_var", bn.running_var, var)):
        err = float((ours - hand).abs().max())
        assert err <= 1e-12 * max(1.0, float(hand.abs().max())), f"{convention} {name}: max error {err:.3g}"
    assert int(bn.num_batches_tracked) == STEPS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"convention": "mxnet"}, "unknown convention 'mxnet'", id="unknown-convention"),
        pytest.param({"convention": "keras", "momentum": None}, "only defined for 'torch'", id="keras-momentumNone"),
        pytest.param({"convention": "caffe", "momentum": 1.5}, "momentum", id="caffe-momentum1.5"),
    ],
)
def test_bad_convention_arguments_are_refused_by_spec(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        torch_ref.BatchNorm1d(4, **kwargs)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_repr_names_a_convention_other_than_torch(convention: str) -> None:
    text = repr(torch_ref.BatchNorm1d(4, convention=convention))
    assert ("convention=" in text) == (convention != "torch"), text
    assert text.startswith("BatchNorm1d(4, eps=1e-05, momentum=0.1"), text
