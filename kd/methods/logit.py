"""Logit KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), and the logit
standardisation that the logit-family methods (logit, dkd, ctkd) can apply first.

KD is KL(teacher || student) between temperature-softened distributions, times T^2 so that the
gradient scale does not shrink with T, averaged over the batch.

Logit standardisation (Sun, Ren, Li, Wang, Cao, CVPR 2024, "Logit Standardization in Knowledge
Distillation", Algorithm 1, the Z-score function): each network's logits are z-scored per sample, Z(z) = (z - mean z) / std z,
before they are divided by the (base) temperature, so the student matches the teacher's logit
relations, not their range. std has Bessel's correction, as in the authors' code (`Tensor.std`),
so Z(z) = sqrt(K - 1) * (z - mean z) / ||z - mean z|| for K classes.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Features, Method, register_method
from kd.methods.features import unit


def standardized(logits: Tensor) -> Tensor:
    """Per-sample z-scores of (N, K) logits, fp32. A sample whose logits are all equal has no
    relations to match: it becomes 0 with a zero gradient (the authors' (z - mean) / (std + 1e-7)
    has a 0/0 gradient there, NaN)."""
    z = logits.float()
    return unit(z - z.mean(dim=1, keepdim=True), dim=1) * math.sqrt(z.shape[1] - 1)


def logit_pair(student: Features, teacher: Features, standardize: bool) -> tuple[Tensor, Tensor]:
    """The two networks' logits (outputs[-1]) as the softened softmax sees them: z-scored when
    `standardize` (logit standardisation), else as they are."""
    s, t = student[-1], teacher[-1]
    return (standardized(s), standardized(t)) if standardize else (s, t)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Hinton's loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch. T may be a
    0-dim tensor (CTKD's learned temperature), and the gradient then reaches it."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_method
class Logit(Method):
    name = "logit"
    reference = "Hinton, Vinyals, Dean 2015, eq. 2 (soft targets at temperature T, scaled by T^2)"
    options = {
        "logit_weight": (1.0, "weight of the KD term (logit standardisation's published setting: 10 at alpha 0.9)"),
        "logit_standardize": (False, "z-score both networks' logits before softening them (Sun et al. 2024; "
                                     "published with --temperature 2)"),
    }
    options_added_later = ("logit_weight", "logit_standardize")  # runs of kd 0.1 have keys without them
    logit_weight: float
    logit_standardize: bool

    def forward(
        self, student: Features, teacher: Features | None, targets: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        s, t = logit_pair(student, teacher, self.logit_standardize)
        return {"loss_kd": self.logit_weight * kd_loss(s, t, self.temperature)}
