"""Wide CIFAR ResNets: ResNet-18, the lab plan's ResNet-8 and ResNet-50, four stages of 64/128/256/512 channels.

Same network family as the thin ResNets in resnet_cifar.py (3x3 stride-1 stem, no max-pool, BasicBlocks,
1x1 conv + BN projection shortcuts), only with four wider stages, so we build them with `CifarResNet`
rather than a second copy of the stage loop. `forward` returns `[stage1, stage2, stage3, stage4, logits]`.
ResNet18 and ResNet50 are the field's (RepDistiller's models/resnetv2.py, the teacher of its heterogeneous
ResNet50 -> MobileNetV2 pair): ResNet50 has Bottleneck blocks (3, 4, 6, 3), so 4x the stage widths out.
"""

from __future__ import annotations

from torch import nn

from kd.models.registry import register_model
from kd.models.resnet_cifar import Bottleneck, CifarResNet

WIDE = (64, 128, 256, 512)
REFERENCE = "He et al. 2016 with a CIFAR stem (3x3, stride 1, no max-pool); RepDistiller models/resnetv2.py"


@register_model("ResNet18", "CIFAR ResNet-18: 2 BasicBlocks per stage, 64/128/256/512 channels, no max-pool",
                family="resnet", reference=REFERENCE)
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(2, num_classes, in_channels, widths=WIDE)


@register_model("ResNet8w", "the lab plan's ResNet-8: 1 BasicBlock per stage, 64/128/256/512 channels",
                family="resnet", reference="the lab plan: ResNet-18's layout with one block per stage")
def resnet8w(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(1, num_classes, in_channels, widths=WIDE)


@register_model("ResNet50", "the field's CIFAR ResNet-50: Bottlenecks (3, 4, 6, 3), 256/512/1024/2048 out",
                family="resnet", reference=REFERENCE)
def resnet50(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels, widths=WIDE, block=Bottleneck)
