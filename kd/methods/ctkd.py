"""CTKD, global temperature (Li, Li, Yang, Zhao, Song, Liang, Yang, AAAI 2023, "Curriculum Temperature
for Knowledge Distillation"; official code: zhengli97/CTKD, `Global_T`).

The temperature of Hinton's KD is learned, adversarially: one parameter theta gives
T = t_min + t_range * sigmoid(theta) (theta starts at 1, so T starts at 15.6 with the defaults),
and theta reaches the loss through a gradient reversal layer (Ganin & Lempitsky 2015): identity
forward, gradient times -lambda backward. The student descends the KD loss while theta ascends
it (sec. 3: min over the student, max over T), so T moves to where the student finds the
teacher hardest to match. The curriculum raises the reversal's strength with a cosine from 0 to
lambda_max over the first `ctkd_curriculum_epochs` epochs (sec. 3, lambda_n with lambda_min = 0):

    lambda(e) = lambda_max * (1 - cos(pi * min(e, E) / E)) / 2,   e = 1, 2, ... (E = 0: lambda_max)
    loss_ctkd = ctkd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

theta is a parameter of the method module, so it trains with the student's optimiser (with its
weight decay, as in the authors' code) and its value and momentum are in every checkpoint. The
shared `temperature` is not used: the temperature is learned. `ctkd_standardize` z-scores both
networks' logits before they are divided by T (logit standardisation, kd/methods/logit.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kd.methods.base import Features, Method, Shapes, at_least, positive, register_method
from kd.methods.logit import kd_loss, logit_pair

THETA_START = 1.0  # the authors' Global_T starts at torch.ones(1)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times -strength backward (the strength is a constant)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """x, through which a gradient flows back times -strength."""
    return _ReverseGradient.apply(x, strength)


def curriculum_strength(epoch: int, curriculum_epochs: int, strength_max: float) -> float:
    """lambda(epoch): a cosine rise from 0 to `strength_max` over `curriculum_epochs` epochs."""
    if curriculum_epochs <= 0:
        return strength_max
    return strength_max * (1 - math.cos(math.pi * min(epoch, curriculum_epochs) / curriculum_epochs)) / 2


def learned_temperature(theta: Tensor, t_min: float, t_range: float) -> Tensor:
    """T = t_min + t_range * sigmoid(theta), a 0-dim tensor."""
    return t_min + t_range * torch.sigmoid(theta.float()).squeeze()


@register_method
class CTKD(Method):
    name = "ctkd"
    reference = "Li et al. AAAI 2023, sec. 3 (KD at a temperature learned through gradient reversal, cosine curriculum)"
    options = {
        "ctkd_weight": (1.0, "weight of the KD term at the learned temperature (published: 1 at alpha 0.9)"),
        "ctkd_t_min": (1.0, "lowest temperature: T = t_min + t_range * sigmoid(theta)"),
        "ctkd_t_range": (20.0, "range of the temperature above t_min"),
        "ctkd_curriculum_epochs": (10, "epochs over which the reversal strength rises (cosine) from 0 to its maximum"),
        "ctkd_lambda_max": (1.0, "the gradient reversal's final strength lambda"),
        "ctkd_standardize": (False, "z-score both networks' logits before softening them (Sun et al. 2024; "
                                    "published with ctkd_weight 10 at alpha 0.9)"),
    }
    rules = {"ctkd_t_min": positive(), "ctkd_t_range": positive(), "ctkd_curriculum_epochs": at_least(0),
             "ctkd_lambda_max": at_least(0)}
    ctkd_weight: float
    ctkd_t_min: float
    ctkd_t_range: float
    ctkd_curriculum_epochs: int
    ctkd_lambda_max: float
    ctkd_standardize: bool

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes | None, **options: Any) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        self.theta = nn.Parameter(torch.full((1,), THETA_START))

    def epoch_key(self, epoch: int) -> int:
        return min(epoch, self.ctkd_curriculum_epochs)  # lambda is flat after the curriculum

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        strength = curriculum_strength(epoch, self.ctkd_curriculum_epochs, self.ctkd_lambda_max)
        temperature = learned_temperature(reverse_gradient(self.theta, strength), self.ctkd_t_min, self.ctkd_t_range)
        s, t = logit_pair(student, teacher, self.ctkd_standardize)
        return {"loss_ctkd": self.ctkd_weight * kd_loss(s, t, temperature)}
