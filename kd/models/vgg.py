"""VGG with batch norm as the field builds it for CIFAR: VGG8 ... VGG19, no fully connected stack.

Five stages of 3x3 conv (with bias) + BN + ReLU, split by 2x2 max-pools after the first three; the
last two stages both work at 4x4 on 32x32 inputs (a fourth pool comes in at 64x64, as the reference
does for Tiny-ImageNet); then a global average pool and one linear layer from 512. VGG8 is the
field's configuration "S", one conv per stage. This is RepDistiller's models/vgg.py `vgg*_bn`
(its model names vgg8 ... vgg19 are these), reused by mdistiller.

`forward` returns `[stage2, stage3, stage4, stage5, logits]`, after each stage's ReLU: the field's
features f1 ... f4 (its f0, the first stage, is not one the methods pair).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.layers import init_field_weights
from kd.models.registry import register_model

REFERENCE = "Simonyan & Zisserman 2015 with BN, CIFAR layout; RepDistiller models/vgg.py (vgg*_bn)"
# Convs per stage (widths 64, 128, 256, 512, 512), by depth: VGG's configurations S, A, B, D, E.
CONVS_PER_STAGE = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
                   19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


def vgg_stage(in_planes: int, planes: int, convs: int) -> nn.Sequential:
    """`convs` x (conv + BN + ReLU), without the last ReLU: `forward` applies it, so a stage ends pre-activation."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(in_planes if i == 0 else planes, planes, 3, 1, 1), nn.BatchNorm2d(planes), nn.ReLU(True)]
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        stages, in_planes = [], in_channels
        for planes, convs in zip(WIDTHS, CONVS_PER_STAGE[depth], strict=True):
            stages.append(vgg_stage(in_planes, planes, convs))
            in_planes = planes
        self.stages = nn.ModuleList(stages)
        self.pooled_stages = 4 if image_size >= 64 else 3  # stages followed by a 2x2 max-pool
        self.classifier = nn.Linear(in_planes, num_classes)
        init_field_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = F.relu(stage(x))
            if i > 0:
                features.append(x)
            if i < self.pooled_stages:
                x = F.max_pool2d(x, 2)
        return [*features, self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))]


def _register(depth: int) -> None:
    @register_model(f"VGG{depth}", f"VGG-{depth} with BN (CIFAR: 5 stages, 64/128/256/512/512, "
                    f"{'/'.join(map(str, CONVS_PER_STAGE[depth]))} convs), one linear layer",
                    family="vgg", reference=REFERENCE)
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return VGG(depth, num_classes, in_channels, image_size)


for _depth in CONVS_PER_STAGE:
    _register(_depth)
