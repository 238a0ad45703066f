"""Thin CIFAR ResNets (He et al. 2016, sec. 4.2): three stages of BasicBlocks, 16/32/64 channels.

Depth 6n+2 in He et al.'s naming. The user's "ResNet112" has 18 blocks per stage, which He et al.
call ResNet-110; we keep the user's name (and also offer ResNet110, the same network) so run
names match the thesis. Shortcuts that change shape are a 1x1 convolution + BN projection.
`forward` returns `[stage1, stage2, stage3, logits]`, the features the methods distil (after each
stage's last ReLU).

These are also the field's CIFAR ResNets (RepDistiller's models/resnet.py, reused by mdistiller):
same layers, and for 100 classes the same parameter counts (tests/test_models_field.py). Its
ResNet8x4 / ResNet32x4 are the same networks with a 32-channel stem and 64/128/256 stages.
`CifarResNet` also takes Bottleneck blocks and per-stage block counts, for the CIFAR ResNet-50.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.layers import conv_bn, init_field_weights
from kd.models.registry import register_model

WIDTHS = (16, 32, 64)
HE = "He et al. 2016, CIFAR ResNets (sec. 4.2); RepDistiller models/resnet.py"


def projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """The shortcut: identity (an empty Sequential) unless the shape changes, then 1x1 conv + BN."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return conv_bn(in_planes, planes, 1, stride, relu=False)


class BasicBlock(nn.Module):
    expansion = 1  # output channels per `planes`

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to 4x `planes`, as in ResNet-50."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stride-1 stem, one stage per width (the first at stride 1, the others 2), global average
    pool, linear classifier. `blocks_per_stage` is one count for every stage or one per stage; `stem`
    is the stem's width (default: the first stage's)."""

    def __init__(
        self,
        blocks_per_stage: int | Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = WIDTHS,
        stem: int | None = None,
        block: type[BasicBlock | Bottleneck] = BasicBlock,
    ) -> None:
        super().__init__()
        counts = [blocks_per_stage] * len(widths) if isinstance(blocks_per_stage, int) else blocks_per_stage
        in_planes = stem or widths[0]
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        stages = []
        for i, (planes, count) in enumerate(zip(widths, counts, strict=True)):
            layers = []
            for b in range(count):
                layers.append(block(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        init_field_weights(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        features = []
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        logits = self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
        return [*features, logits]


def _register(name: str, blocks: int, note: str = "") -> None:
    @register_model(name, f"CIFAR ResNet, {blocks} BasicBlocks per stage, 16/32/64 channels{note}",
                    family="resnet_cifar", reference=HE)
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(blocks, num_classes, in_channels)


for _name, _blocks in (("ResNet8", 1), ("ResNet20", 3), ("ResNet32", 5), ("ResNet56", 9), ("ResNet110", 18)):
    _register(_name, _blocks)
_register("ResNet112", 18, " (the user's name for He et al.'s ResNet-110; the thesis teacher)")

X4 = (64, 128, 256)  # the field's "x4" ResNets: 4x the channels, a 32-channel stem
X4_REFERENCE = "RepDistiller models/resnet.py resnet8x4 / resnet32x4 (Tian et al. 2020, CRD)"


@register_model("ResNet8x4", "the field's ResNet8x4: 1 BasicBlock per stage, 32-channel stem, 64/128/256",
                family="resnet_cifar", reference=X4_REFERENCE)
def resnet8x4(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(1, num_classes, in_channels, widths=X4, stem=32)


@register_model("ResNet32x4", "the field's ResNet32x4: 5 BasicBlocks per stage, 32-channel stem, 64/128/256",
                family="resnet_cifar", reference=X4_REFERENCE)
def resnet32x4(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(5, num_classes, in_channels, widths=X4, stem=32)
