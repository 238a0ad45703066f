"""ReviewKD (Chen, Liu, Zhao, Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review"; official
code: dvlab-research/ReviewKD, and mdistiller's `ReviewKD`).

Each of the student's levels learns from the teacher's level of the same depth *and* the
deeper ones: the student's levels are fused from the deepest up by attention-based fusion (ABF,
sec. 3): a level's 1x1-reduced map and the fused map from below (resized to it) are mixed by
two per-position attention weights, and a 3x3 conv maps the mix onto the teacher level's
channels and size. The hierarchical context loss (HCL, sec. 3) compares each output with the
teacher's level at full size and as 4x4, 2x2, 1x1 average-pooled pyramids (those smaller than
the map), weighted 1, 1/2, 1/4, 1/8 and normalised by their sum; the levels are summed:

    loss_reviewkd = ramp * reviewkd_weight * sum_levels HCL(ABF outputs, teacher levels)
    ramp = min(epoch / reviewkd_warmup, 1)                 (epoch is 1-based, as in mdistiller)

Levels, as the authors': the paired stages (from the deepest down, kd's convention) plus the
global-average-pooled last stage as a 1x1 map. The teacher's levels are kd's stage outputs,
which are after the ReLU (the authors take the teacher's pre-activation maps; kd's models
return no pre-activations). The fusion modules train with the student (and are checkpointed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import Features, Method, Shapes, at_least, register_method
from kd.methods.features import fp32

PYRAMID = (4, 2, 1)  # HCL's pooled sizes, each counted at half the weight of the one before
MAX_MID_CHANNELS = 512  # the authors' cap on the fused maps' channels


class AttentionFusion(nn.Module):
    """ABF: reduce a student level to `mid` channels, mix it with the fused map from the deeper
    level by two sigmoid attention maps (not on the deepest level), resize the mix to the teacher
    level's size, and map it onto the teacher level's channels. Returns (output, mix)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the authors'
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def _level_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """HCL of one level: full-size MSE, then MSEs of the smaller pyramid pools at halving weights."""
    losses, weights = [F.mse_loss(student, teacher)], [1.0]
    for size in (s for s in PYRAMID if s < min(student.shape[-2:])):
        weights.append(weights[-1] / 2)
        losses.append(F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)))
    return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)


@fp32
def hcl_loss(student_levels: list[Tensor], teacher_levels: list[Tensor]) -> Tensor:
    """Hierarchical context loss, summed over the levels; fp32, teacher detached."""
    return sum(_level_loss(s.float(), t.detach().float())
               for s, t in zip(student_levels, teacher_levels, strict=True))


def levels(outputs: Features, stages: int) -> list[Tensor]:
    """The last `stages` stage maps, then the last stage's global average pool as a 1x1 map."""
    maps = list(outputs[:-1][-stages:])
    return [*maps, maps[-1].mean(dim=(-2, -1), keepdim=True)]


def level_shapes(shapes: Shapes, stages: int) -> list[tuple[int, int, int]]:
    """`levels`' (C, H, W) from a model's output shapes."""
    maps = [tuple(s) for s in shapes[:-1][-stages:]]
    return [*maps, (maps[-1][0], 1, 1)]


@register_method
class ReviewKD(Method):
    name = "reviewkd"
    reference = "Chen et al. CVPR 2021, sec. 3 (attention-based fusion of the student's levels, hierarchical context loss)"
    options = {
        "reviewkd_weight": (1.0, "weight of the review loss (authors: 0.6 ResNet56->20, 1 ResNet110->32, 5 for x4/WRN)"),
        "reviewkd_warmup": (20, "epochs over which the term ramps up linearly from 1/warmup to 1"),
    }
    rules = {"reviewkd_warmup": at_least(0)}
    reviewkd_weight: float
    reviewkd_warmup: int

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, **options: Any) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        self.stages = min(len(student_shapes), len(teacher_shapes)) - 1
        student_levels = level_shapes(student_shapes, self.stages)
        teacher_levels = level_shapes(teacher_shapes, self.stages)
        self.teacher_sizes = [(h, w) for _, h, w in teacher_levels]
        mid = min(MAX_MID_CHANNELS, student_levels[-1][0])
        deepest_first = zip(reversed(student_levels), reversed(teacher_levels), strict=True)
        self.fusions = nn.ModuleList(AttentionFusion(s[0], mid, t[0], fuse=i > 0)
                                     for i, (s, t) in enumerate(deepest_first))

    def epoch_key(self, epoch: int) -> int:
        return min(epoch, self.reviewkd_warmup)  # the ramp is flat after the warm-up

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        outputs, deeper = [], None
        for fusion, level, size in zip(self.fusions, reversed(levels(student, self.stages)),
                                       reversed(self.teacher_sizes), strict=True):
            out, deeper = fusion(level, deeper, size)
            outputs.append(out)
        loss = hcl_loss(outputs[::-1], levels(teacher, self.stages))
        ramp = min(epoch / self.reviewkd_warmup, 1.0) if self.reviewkd_warmup > 0 else 1.0
        return {"loss_reviewkd": ramp * self.reviewkd_weight * loss}
