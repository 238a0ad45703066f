"""Wide ResNets (Zagoruyko & Komodakis 2016) as the field builds them for CIFAR: WRN-16-1 ... WRN-40-2.

WRN-d-k has (d - 4) / 6 pre-activation blocks (BN-ReLU before each 3x3 conv) per stage, stages of
16k/32k/64k channels after a 16-channel stem, and a final BN-ReLU before the pool; a shortcut that
changes shape is a 1x1 conv of the block's activated input. No dropout. This is RepDistiller's
models/wrn.py (reused by mdistiller): same layers, the same parameter counts.

`forward` returns `[stage1, stage2, stage3, logits]`: each stage's output as the field's feature
methods take it (`is_feat=True, preact=False`): the residual sum, before the next BN-ReLU (in this
pre-activation layout that is where a stage ends); the logits come from BN-ReLU(stage3), pooled.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.layers import init_field_weights
from kd.models.registry import register_model

REFERENCE = "Zagoruyko & Komodakis 2016 (WRN); RepDistiller models/wrn.py"


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        reshapes = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if reshapes else None

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth {depth} is not 6n + 4: pass 16, 22, 28, 40, ...")
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for i, planes in enumerate((16 * widen, 32 * widen, 64 * widen)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(
                PreActBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1) for b in range(blocks)
            )))
            in_planes = planes
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_field_weights(self)
        nn.init.zeros_(self.fc.bias)  # the reference zeroes the classifier's bias, keeping PyTorch's weights

    def forward(self, x: Tensor) -> list[Tensor]:
        out, features = self.conv1(x), []
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        logits = self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))
        return [*features, logits]


def _register(depth: int, widen: int) -> None:
    @register_model(f"WRN{depth}_{widen}", f"Wide ResNet WRN-{depth}-{widen}: {(depth - 4) // 6} pre-activation "
                    f"blocks per stage, {16 * widen}/{32 * widen}/{64 * widen} channels",
                    family="wrn", reference=REFERENCE)
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
