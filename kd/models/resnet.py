"""Wide CIFAR ResNets: ResNet-18 and the lab plan's ResNet-8, four stages of 64/128/256/512 channels.

Same network family as the thin ResNets in resnet_cifar.py (3x3 stride-1 stem, no max-pool, BasicBlocks,
1x1 conv + BN projection shortcuts), only with four wider stages, so we build them with `CifarResNet`
rather than a second copy of the stage loop. `forward` returns `[stage1, stage2, stage3, stage4, logits]`.
"""

from __future__ import annotations

from torch import nn

from kd.models.registry import register_model
from kd.models.resnet_cifar import CifarResNet

WIDE = (64, 128, 256, 512)


@register_model("ResNet18", "CIFAR ResNet-18: 2 BasicBlocks per stage, 64/128/256/512 channels, no max-pool")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(2, num_classes, in_channels, widths=WIDE)


@register_model("ResNet8w", "the lab plan's ResNet-8: 1 BasicBlock per stage, 64/128/256/512 channels")
def resnet8w(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(1, num_classes, in_channels, widths=WIDE)
