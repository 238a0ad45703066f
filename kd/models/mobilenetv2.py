"""MobileNetV2 (Sandler et al. 2018) as the field builds it for CIFAR: half width, expansion 6.

The field's "MobileNetV2" is RepDistiller's `mobile_half` (models/mobilenetv2.py, from the Route
Constrained Optimization code; reused by mdistiller): width multiplier 0.5 on every stage but the
last 1x1 conv (1280 channels either way), expansion 6 (1 in the first group), a stride-2 3x3 stem,
strides (1, 1, 2, 2, 1, 2, 1) over the seven groups. Unlike the paper, every inverted residual
keeps its 1x1 expansion conv, even at expansion 1.

`forward` returns `[group2, group3, group5, group7, logits]`, the field's features f1 ... f4 (at
16, 8, 4 and 2 pixels on 32x32 inputs: 12, 16, 48 and 160 channels).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.layers import conv_bn, init_field_weights
from kd.models.registry import register_model

REFERENCE = "Sandler et al. 2018; RepDistiller models/mobilenetv2.py mobile_half (width 0.5, expansion 6)"
# (expansion, channels at width 1, blocks, first stride) per group, as in the paper's table 2.
GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FEATURE_GROUPS = (1, 2, 4, 6)  # the groups whose outputs are the field's features f1 ... f4
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU, 3x3 depthwise (the stride) + BN + ReLU, 1x1 project + BN; identity
    shortcut where the shape is unchanged."""

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.residual = stride == 1 and in_planes == planes
        self.conv = nn.Sequential(
            conv_bn(in_planes, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, planes, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 0.5) -> None:
        super().__init__()
        in_planes = int(32 * width)
        self.stem = conv_bn(in_channels, in_planes, 3, 2)
        groups = []
        for expansion, channels, blocks, stride in GROUPS:
            planes = int(channels * width)
            group = []
            for b in range(blocks):
                group.append(InvertedResidual(in_planes, planes, stride if b == 0 else 1, expansion))
                in_planes = planes
            groups.append(nn.Sequential(*group))
        self.groups = nn.ModuleList(groups)
        self.head = conv_bn(in_planes, LAST_CHANNELS, 1)
        self.classifier = nn.Linear(LAST_CHANNELS, num_classes)
        init_field_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> list[Tensor]:
        x, features = self.stem(x), []
        for i, group in enumerate(self.groups):
            x = group(x)
            if i in FEATURE_GROUPS:
                features.append(x)
        return [*features, self.classifier(F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))]


@register_model("MobileNetV2", "the field's MobileNetV2: half width (0.5), expansion 6, 1280-channel head",
                family="mobilenet", reference=REFERENCE)
def mobilenetv2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return MobileNetV2(num_classes, in_channels)
