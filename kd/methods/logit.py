"""Logit KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

KL(teacher || student) between temperature-softened distributions, times T^2 so that the
gradient scale does not shrink with T, averaged over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Features, Method, register_method


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_method
class Logit(Method):
    name = "logit"
    reference = "Hinton, Vinyals, Dean 2015, eq. 2 (soft targets at temperature T, scaled by T^2)"

    def forward(
        self, student: Features, teacher: Features | None, targets: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        return {"loss_kd": kd_loss(student[-1], teacher[-1], self.temperature)}
