"""The three LeNets of ``keras_bn.model`` in PyTorch, layer for layer (NCHW instead of NHWC).

Submodule names equal the Keras layer names (``model.bn3`` is Keras' ``bn3``), so the weight transfer
in ``torch_ref.transfer`` pairs them in order; layers without weights (activations, pooling, resize)
carry the same names too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

import spec
from torch_ref.batch_norm import BatchNorm1d, BatchNorm2d

_BATCH_NORMS = {
    "ours": (BatchNorm1d, BatchNorm2d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
}


class D2LBatchNorm1d(BatchNorm1d):
    """``torch_ref.BatchNorm1d(convention="d2l")``: the chapter's scratch BN on dense layers.

    d2l's from-scratch ``batch_norm`` weights the *new* value by ``momentum`` (0.9 as it calls it)
    and averages the biased batch variance (SPEC.md §5, d2l row).
    """

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, convention="d2l", **kwargs)


class D2LBatchNorm2d(BatchNorm2d):
    """``torch_ref.BatchNorm2d(convention="d2l")``: the chapter's scratch BN on conv layers."""

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, convention="d2l", **kwargs)


_D2L_BATCH_NORMS = (D2LBatchNorm1d, D2LBatchNorm2d)
_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass(frozen=True)
class _Architecture:
    activation: str  # "relu" | "sigmoid" | "tanh"; modules named f"{activation}{index}"
    pooling: type  # nn.MaxPool2d | nn.AvgPool2d
    default_convention: str  # of batch_norm="ours" when convention is None: "torch" or "d2l"
    resize_to: tuple[int, int] | None = None
    init: str = "torch"  # "torch": PyTorch's defaults; "xavier": Xavier-uniform weights, biases bias_fill
    bias_fill: float = 0.0


_LENET_BN = _Architecture("relu", nn.MaxPool2d, "torch")
_D2L = _Architecture("sigmoid", nn.AvgPool2d, "d2l", init="xavier")
_LENET5 = _Architecture("tanh", nn.AvgPool2d, "torch", resize_to=(32, 32), init="xavier", bias_fill=0.01)


def _batch_norm_classes(batch_norm: str | None, convention: str | None, arch: _Architecture) -> tuple:
    if batch_norm is not None and batch_norm not in _BATCH_NORMS:
        raise ValueError(f"batch_norm must be 'ours', 'torch' or None, got {batch_norm!r}")
    if batch_norm is None:
        if convention is not None:
            raise ValueError(f"batch_norm=None builds no BN layers, so convention={convention!r} cannot apply")
        return None, None
    convention = convention or (arch.default_convention if batch_norm == "ours" else "torch")
    if convention not in ("torch", "d2l") or (batch_norm == "torch" and convention != "torch"):
        raise ValueError(
            f"convention must be 'torch' (or 'd2l' with batch_norm='ours'), got {convention!r} for {batch_norm!r}"
        )
    return _D2L_BATCH_NORMS if convention == "d2l" else _BATCH_NORMS[batch_norm]


def _build(
    arch: _Architecture,
    batch_norm: str | None,
    convention: str | None,
    momentum: float | None,
    eps: float,
    num_classes: int,
    seed: int | None,
) -> nn.Sequential:
    bn1d, bn2d = _batch_norm_classes(batch_norm, convention, arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if momentum == "default":
        momentum = spec.get_convention("d2l" if bn1d is D2LBatchNorm1d else "torch").default_momentum

    def bn(cls, name: str, width: int) -> list[tuple[str, nn.Module]]:
        return [] if cls is None else [(name, cls(width, eps=eps, momentum=momentum))]

    def act(index: int) -> tuple[str, nn.Module]:
        return f"{arch.activation}{index}", _ACTIVATIONS[arch.activation]()

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        resize = []
        if arch.resize_to is not None:
            # = keras.layers.Resizing(bilinear, antialias=False): half-pixel centres, edge-clamped.
            resize = [("resize", nn.Upsample(size=arch.resize_to, mode="bilinear", align_corners=False))]
        side = ((arch.resize_to or (28, 28))[0] - 4) // 2
        side = (side - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4; 32 -> 28 -> 14 -> 10 -> 5
        layers = [
            *resize,
            ("conv1", nn.Conv2d(1, 6, 5)),
            *bn(bn2d, "bn1", 6),
            act(1),
            ("pool1", arch.pooling(2)),
            ("conv2", nn.Conv2d(6, 16, 5)),
            *bn(bn2d, "bn2", 16),
            act(2),
            ("pool2", arch.pooling(2)),
            ("flatten", nn.Flatten()),  # (C, H, W) order; Keras flattens (H, W, C): see transfer.py
            ("fc1", nn.Linear(16 * side * side, 120)),
            *bn(bn1d, "bn3", 120),
            act(3),
            ("fc2", nn.Linear(120, 84)),
            *bn(bn1d, "bn4", 84),
            act(4),
            ("fc3", nn.Linear(84, num_classes)),
        ]
        if arch.init == "xavier":
            for _, module in layers:
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.constant_(module.bias, arch.bias_fill)
    return nn.Sequential(OrderedDict(layers))


def lenet_bn(
    batch_norm: str | None = "ours",
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_classes: int = 10,
    seed: int | None = None,
) -> nn.Sequential:
    """LeNet-5 with BN after every conv/hidden dense, on (N, 1, 28, 28) input, returning logits.

    conv1(6, 5x5) bn1 relu1 pool1 conv2(16, 5x5) bn2 relu2 pool2 flatten fc1(120) bn3 relu3
    fc2(84) bn4 relu4 fc3(num_classes); 'valid' convolutions, 2x2 max pooling, biases everywhere.
    44,878 parameters with BN, 44,426 without (``batch_norm=None`` leaves the bn* modules out).

    ``batch_norm``: "ours" (``torch_ref.BatchNorm*d``), "torch" (``torch.nn.BatchNorm*d``) or None.
    ``seed`` makes PyTorch's default initialization reproducible without touching the global RNG.
    """
    return _build(_LENET_BN, batch_norm, None, momentum, eps, num_classes, seed)


def d2l_lenet_bn(
    batch_norm: str | None = "ours",
    convention: str | None = None,
    momentum: float | None | str = "default",
    eps: float = 1e-5,
    num_classes: int = 10,
    seed: int | None = None,
) -> nn.Sequential:
    """d2l's LeNet-BN (keras_bn.d2l_lenet_bn): :func:`lenet_bn`'s shapes, sigmoid1..4, 2x2 average pooling.

    ``batch_norm="ours"`` with ``convention=None``/``"d2l"``: :class:`D2LBatchNorm2d`/``1d``, the
    chapter's from-scratch BN (momentum 0.9 on the new value, biased running variance);
    ``convention="torch"``: ``torch_ref.BatchNorm*d``. ``"torch"``: ``torch.nn.BatchNorm*d``, the
    chapter's concise version. ``momentum="default"``: the convention's (d2l 0.9, torch 0.1).
    Xavier-uniform weights (d2l's ``init_cnn``), zero biases. Counts as :func:`lenet_bn`.
    """
    return _build(_D2L, batch_norm, convention, momentum, eps, num_classes, seed)


def lenet5(
    batch_norm: str | None = "ours",
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_classes: int = 10,
    seed: int | None = None,
) -> nn.Sequential:
    """LeNet-5 of the Paperspace article (keras_bn.lenet5) on (N, 1, H, W) input, any H, W.

    resize (bilinear to 32x32) conv1(6) bn1 tanh1 pool1 (avg) conv2(16) bn2 tanh2 pool2 (avg) flatten
    fc1(400 -> 120) bn3 tanh3 fc2(84) bn4 tanh4 fc3; Xavier-uniform weights, biases 0.01.
    61,706 parameters without BN, 62,158 with (+452 running statistics).
    """
    return _build(_LENET5, batch_norm, None, momentum, eps, num_classes, seed)


#: Builder per model name (the names of ``keras-bn run --model``).
BUILDERS = {"lenet-bn": lenet_bn, "d2l-lenet-bn": d2l_lenet_bn, "lenet5": lenet5}
