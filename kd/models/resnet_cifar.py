"""Thin CIFAR ResNets (He et al. 2016, sec. 4.2): three stages of BasicBlocks, 16/32/64 channels.

Depth 6n+2 in He et al.'s naming. The user's "ResNet112" has 18 blocks per stage, which He et al.
call ResNet-110; we keep the user's name (and also offer ResNet110, the same network) so run
names match the thesis. Shortcuts that change shape are a 1x1 convolution + BN projection.
`forward` returns `[stage1, stage2, stage3, logits]`, the features the methods distil.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.registry import register_model

WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages (stride 1, 2, 2), global average pool, linear classifier."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int, in_channels: int = 3, widths=WIDTHS
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        features = []
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        logits = self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
        return [*features, logits]


def _register(name: str, blocks: int, note: str = "") -> None:
    @register_model(name, f"CIFAR ResNet, {blocks} BasicBlocks per stage, 16/32/64 channels{note}")
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(blocks, num_classes, in_channels)


for _name, _blocks in (("ResNet8", 1), ("ResNet20", 3), ("ResNet32", 5), ("ResNet56", 9), ("ResNet110", 18)):
    _register(_name, _blocks)
_register("ResNet112", 18, " (the user's name for He et al.'s ResNet-110; the thesis teacher)")
