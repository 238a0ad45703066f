"""Helpers shared by the methods: stage selection and pairing, spatial matching, fp32, safe norms.

Models return `[stage features..., logits]`; a method's "stages" are `outputs[:-1]`, numbered
from 1. Losses are computed in fp32 even under autocast (normalisations, distances and
eigenvectors lose too much in bf16/fp16), so the feature helpers return fp32 tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import SpecError
from kd.methods.base import Features, Shapes

T = TypeVar("T")

EPS = 1e-12  # squared norms / distances at or below this count as zero


def fp32(loss: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run a loss with autocast off, so its matmuls stay in fp32 (autocast would cast
    them to bf16/fp16 even for fp32 inputs); the loss casts its inputs with `.float()`."""

    @functools.wraps(loss)
    def run(*args, **kwargs) -> T:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return loss(*args, **kwargs)

    return run


def unit(x: Tensor, dim: int) -> Tensor:
    """x / ||x|| along `dim`; a vector with ||x||^2 <= EPS becomes 0 with a zero gradient.

    F.normalize divides a zero vector by its eps floor, so its gradient is 1/eps (1e12): finite,
    but enough to wreck an update or overflow fp16 under AMP. A degenerate vector has no
    direction, so here it contributes nothing instead.
    """
    squared = x.pow(2).sum(dim, keepdim=True)
    return x * torch.rsqrt(squared.clamp_min(EPS)) * (squared > EPS).to(x.dtype)


def check_stage(option: str, stage: int, shapes: Shapes, whose: str) -> int:
    """Validate a 1-based stage option against a model's shapes; returns the 0-based index."""
    stages = len(shapes) - 1
    if not 1 <= stage <= stages:
        raise SpecError(
            f"{option} {stage} is not a stage of the {whose} (it has stages 1-{stages}): pass 1-{stages}"
        )
    return stage - 1


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever map is larger down to the smaller spatial size (per dimension)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[-2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def stage_pairs(student: Features, teacher: Features) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) stage maps paired from the deepest stage down, as many as both have.

    Pairing from the end aligns the semantically closest stages when the depths differ (a
    4-stage ResNet18 against a 3-stage CIFAR ResNet). The teacher side is detached; both are
    fp32 and have equal spatial size (the larger one average-pooled).
    """
    s_feats, t_feats = student[:-1], teacher[:-1]
    n = min(len(s_feats), len(t_feats))
    pairs = zip(s_feats[len(s_feats) - n :], t_feats[len(t_feats) - n :], strict=True)
    return [match_spatial(s.float(), t.detach().float()) for s, t in pairs]


def pooled_embedding(feature: Tensor) -> Tensor:
    """Global-average-pooled feature map (N, C), in fp32: the embedding the classifier sees."""
    return feature.float().mean(dim=(-2, -1))
