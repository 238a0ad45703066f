"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) as the field builds them for CIFAR.

Both are RepDistiller's (models/ShuffleNetv1.py `ShuffleV1`, ShuffleNetv2.py `ShuffleV2`; reused by
mdistiller): a 1x1 stem to 24 channels at full resolution, three stages that each halve the map
first, a global average pool and one linear layer. V1: groups 3, 240/480/960 channels, 4/8/4 units;
V2: 1x, 116/232/464 channels, 3/7/3 units after each down-sampling unit, and a 1x1 conv to 1024.
Where they differ from the papers the reference is followed: V1 has a ReLU after its depthwise conv.

`forward` returns `[stage1, stage2, stage3, logits]`: each stage's output (V1 after its ReLU, V2
after its channel shuffle), the field's features f1 ... f3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.layers import channel_shuffle, conv_bn
from kd.models.registry import register_model

STEM = 24
V1_REFERENCE = "Zhang et al. 2018 (ShuffleNet), g = 3; RepDistiller models/ShuffleNetv1.py ShuffleV1"
V2_REFERENCE = "Ma et al. 2018 (ShuffleNet V2), 1x; RepDistiller models/ShuffleNetv2.py ShuffleV2"


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 reduce to a quarter, shuffle, 3x3 depthwise, grouped 1x1 expand. A stride-2 unit
    concatenates a 3x3 average-pooled shortcut (so its branch makes only the new channels); the
    stage's first unit off the stem has an ungrouped first conv, its input being too narrow."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        branch = planes - in_planes if stride == 2 else planes
        mid = branch // 4
        self.first_groups, self.stride = first_groups, stride
        self.reduce = conv_bn(in_planes, mid, 1, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch, 1, groups=groups, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.first_groups)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, groups: int = 3,
                 widths: tuple[int, ...] = (240, 480, 960), units: tuple[int, ...] = (4, 8, 4)) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, STEM, 1)
        stages, in_planes = [], STEM
        for planes, count in zip(widths, units, strict=True):
            stage = []
            for u in range(count):
                first_groups = 1 if in_planes == STEM else groups
                stage.append(ShuffleUnitV1(in_planes, planes, 2 if u == 0 else 1, groups, first_groups))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x, features = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return [*features, self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))]


class ShuffleUnitV2(nn.Module):
    """Half the channels pass untouched; the other half go 1x1 + BN + ReLU, 3x3 depthwise + BN,
    1x1 + BN + ReLU; the halves are concatenated and shuffled."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        half = planes // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False), conv_bn(half, half, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        kept, changed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(changed)], 1), 2)


class DownUnitV2(nn.Module):
    """Both branches see the whole input at stride 2 (left: 3x3 depthwise + BN, 1x1 + BN + ReLU;
    right: as ShuffleUnitV2's branch with a stride), each making half the output; concat, shuffle."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        half = planes // 2
        self.left = nn.Sequential(conv_bn(in_planes, in_planes, 3, 2, groups=in_planes, relu=False),
                                  conv_bn(in_planes, half, 1))
        self.right = nn.Sequential(conv_bn(in_planes, half, 1), conv_bn(half, half, 3, 2, groups=half, relu=False),
                                   conv_bn(half, half, 1))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (116, 232, 464),
                 units: tuple[int, ...] = (3, 7, 3), last_channels: int = 1024) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, STEM, 1)
        stages, in_planes = [], STEM
        for planes, count in zip(widths, units, strict=True):
            stages.append(nn.Sequential(DownUnitV2(in_planes, planes), *(ShuffleUnitV2(planes) for _ in range(count))))
            in_planes = planes
        self.stages = nn.ModuleList(stages)
        self.head = conv_bn(in_planes, last_channels, 1)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x, features = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return [*features, self.fc(F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))]


@register_model("ShuffleNetV1", "the field's ShuffleNetV1: groups 3, 240/480/960 channels, 4/8/4 units",
                family="shufflenet", reference=V1_REFERENCE)
def shufflenet_v1(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ShuffleNetV1(num_classes, in_channels)


@register_model("ShuffleNetV2", "the field's ShuffleNetV2 (1x): 116/232/464 channels, 3/7/3 units, 1024 head",
                family="shufflenet", reference=V2_REFERENCE)
def shufflenet_v2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ShuffleNetV2(num_classes, in_channels)
