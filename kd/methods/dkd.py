"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022, "Decoupled Knowledge
Distillation").

Hinton's KD split into TCKD, the binary KL between (target, non-target) probabilities, and
NCKD, the KL among the non-target classes (the target logit masked out by subtracting 1000, as
in the official mdistiller code); both times T^2, weighted alpha and beta, and ramped up
linearly over the first `dkd_warmup` epochs. `dkd_standardize` z-scores both networks' logits
first (logit standardisation, kd/methods/logit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import NOT_NEGATIVE, Features, Method, at_least, register_method
from kd.methods.features import fp32
from kd.methods.logit import logit_pair

MASK = 1000.0  # subtracted from the target logit to drop it from the non-target softmax


def _binary_log_probs(logits: Tensor, target_mask: Tensor) -> Tensor:
    """(N, 2) log [p_target, p_non_target] = logsigmoid(+-gap), gap = z_target - logsumexp(z_rest).

    z_target - logsumexp(z) is a difference of numbers of the logits' size, so its float32 error is
    about 1e-7 |z| in absolute terms: at p_target 0.9999 that is 1e-3 of log p_target = -1e-4. The
    gap's error is of the same absolute size, but logsigmoid(gap) moves by only (1 - p) times it, so
    both log-probabilities keep float32's relative precision, and neither underflows to log 0.
    """
    target = (logits * target_mask).sum(dim=1, keepdim=True)
    rest = logits.masked_fill(target_mask.bool(), float("-inf")).logsumexp(dim=1, keepdim=True)
    gap = target - rest
    return torch.cat([F.logsigmoid(gap), F.logsigmoid(-gap)], dim=1)


def _kl(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
    """KL(teacher || student) summed over classes, mean over the batch."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


@fp32
def dkd_losses(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T^2 * KL, unweighted."""
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    target_mask = torch.zeros_like(s).scatter_(1, targets.unsqueeze(1), 1.0)
    tckd = _kl(_binary_log_probs(s, target_mask), _binary_log_probs(t, target_mask))
    nckd = _kl(F.log_softmax(s - MASK * target_mask, dim=1), F.log_softmax(t - MASK * target_mask, dim=1))
    return tckd * temperature**2, nckd * temperature**2


@register_method
class DKD(Method):
    name = "dkd"
    reference = "Zhao et al. CVPR 2022, sec. 3 (KD = TCKD + (1 - p_t) NCKD; loss alpha TCKD + beta NCKD)"
    options = {
        "dkd_alpha": (1.0, "weight of TCKD (target vs non-target binary KL)"),
        "dkd_beta": (8.0, "weight of NCKD (KL among the non-target classes)"),
        "dkd_warmup": (20, "epochs over which both terms ramp up linearly from 1/warmup to 1"),
        "dkd_standardize": (False, "z-score both networks' logits before softening them (Sun et al. 2024; "
                                   "published with --temperature 2, alpha and beta x 9)"),
    }
    options_added_later = ("dkd_standardize",)  # runs of kd 0.1 have keys without them
    rules = {"dkd_alpha": NOT_NEGATIVE, "dkd_beta": NOT_NEGATIVE, "dkd_warmup": at_least(0)}
    dkd_alpha: float
    dkd_beta: float
    dkd_warmup: int
    dkd_standardize: bool

    def epoch_key(self, epoch: int) -> int:
        return min(epoch, self.dkd_warmup)  # the ramp is flat after the warm-up

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        s, t = logit_pair(student, teacher, self.dkd_standardize)
        tckd, nckd = dkd_losses(s, t, targets, self.temperature)
        ramp = min(epoch / self.dkd_warmup, 1.0) if self.dkd_warmup > 0 else 1.0
        return {"loss_dkd_tckd": ramp * self.dkd_alpha * tckd, "loss_dkd_nckd": ramp * self.dkd_beta * nckd}
