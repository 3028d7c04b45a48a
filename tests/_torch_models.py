"""ResNet-18 and MobileNetV2 as torchvision defines them, written here because torchvision cannot be imported.

(Its registry wheel links CUDA libraries and fails to import next to the CPU torch.) Followed, not copied:
pytorch/vision ``torchvision/models/resnet.py`` (``conv3x3``, ``BasicBlock``, ``ResNet.__init__``,
``_make_layer``, ``_forward_impl``) and ``torchvision/models/mobilenetv2.py`` (``InvertedResidual``,
``MobileNetV2``) with ``torchvision/ops/misc.py`` ``Conv2dNormActivation`` (conv with padding
``(k - 1) // 2``, no bias before a norm, then BN, then the activation). Module names and parameter
shapes are torchvision's, so a torchvision ``state_dict`` loads into these; the parameter counts at
1000 classes are torchvision's published 11,689,512 and 3,504,872 (tests/test_convert_torch_models.py).
Only the defaults are written (ResNet-18 layers [2, 2, 2, 2], MobileNetV2 width 1.0, where torchvision's
``_make_divisible`` leaves every width unchanged); the initialization is torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN, the identity (or a strided 1x1 conv + BN) added before the last ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity  # in place, as torchvision writes it: traced as operator.iadd
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ``resnet18()``: 7x7/2 stem, 3x3/2 max-pool, four stages of two BasicBlocks, average pool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, in_planes = (64, 128, 256, 512), 64
        for index, planes in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            self.add_module(
                f"layer{index}", nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))
            )
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
    """torchvision's ``Conv2dNormActivation`` with BatchNorm2d and ReLU6, as MobileNetV2 uses it."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (if t != 1), 3x3 depthwise, linear 1x1 projection; the input added when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = [conv_bn_relu6(in_channels, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2()``: the (t, c, n, s) table of the paper, 1280 features, dropout 0.2, fc."""

    SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features, channels = [conv_bn_relu6(3, 32, stride=2)], 32
        for expand_ratio, out_channels, repeats, stride in self.SETTING:
            for index in range(repeats):
                features.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expand_ratio))
                channels = out_channels
        features.append(conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(num_classes: int, image_size: int) -> nn.Module:
    """EfficientNet-B0 of ``efficientnet-pytorch==0.7.1`` (TF's BN conventions and 'same' padding inside PyTorch).

    ``image_size`` fixes its static 'same' padding (Conv2dStaticSamePadding). The plain swish
    (``x * sigmoid(x)``) replaces the memory-efficient autograd Function, which no tracer can see into.
    """
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-b0", num_classes=num_classes, image_size=image_size)
    model.set_swish(memory_efficient=False)
    return model
