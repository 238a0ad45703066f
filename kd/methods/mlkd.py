"""Multi-level logit distillation (Jin, Wang, Lin, CVPR 2023, "Multi-Level Logit Distillation";
the authors' code: Jin-Ying/Multi-Level-Logit-Distillation, on mdistiller).

The softened predictions P (B x C) of both networks are aligned at three levels, each summed over
five temperatures (the shared temperature, 4 by default, and 2, 3, 5, 6: "prediction augmentation"):

- instance: T^2 KL(p_t || p_s) per sample (sec. 3.2), on the weak view and on the strong view;
- batch: || P_t P_t^T - P_s P_s^T ||_F^2 / B, the samples' B x B Gram matrix (sec. 3.3, eq. 6);
- class: || P_t^T P_t - P_s^T P_s ||_F^2 / C, the classes' C x C Gram matrix (sec. 3.3, eq. 7).

Confidence masking, as the authors' code computes it: on the weak view, the instance and batch
terms are multiplied by the share of samples whose teacher confidence (max softmax) is at or below
the batch median, the class term by the share of classes whose summed teacher probability is at or
below the classes' median (the code multiplies the batch-averaged losses by the 0/1 mask and then
averages it). The strong view (a second, strongly augmented view of each image; the data path
draws it, kd/data/augment.py) enters the instance term unmasked and its own cross-entropy.

`mlkd_standardize` z-scores the logits of the instance terms (logit standardisation,
kd/methods/logit.py), as Sun et al. 2024's code does for MLKD; the batch and class terms and the
confidence shares keep the raw logits there too.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import STRONG_VIEW, Features, Method, register_method
from kd.methods.features import fp32
from kd.methods.logit import standardized

EXTRA_TEMPERATURES = (2.0, 3.0, 5.0, 6.0)  # beside the shared temperature: the authors' five


def soften(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.float() / temperature, dim=1)


def instance_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) per sample, (B,)."""
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2


def batch_alignment(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """|| P_t P_t^T - P_s P_s^T ||_F^2 / B (eq. 6): how alike each pair of samples is predicted."""
    p_s, p_t = soften(student, temperature), soften(teacher, temperature)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / p_s.shape[0]


def class_alignment(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """|| P_t^T P_t - P_s^T P_s ||_F^2 / C (eq. 7): how classes are predicted together over the batch."""
    p_s, p_t = soften(student, temperature), soften(teacher, temperature)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / p_s.shape[1]


def median(values: Tensor) -> Tensor:
    """The median with linear interpolation (numpy's percentile 50, the authors' threshold), by a
    sort: no host read, so a CUDA graph can capture it."""
    ordered = values.sort().values
    position = (values.numel() - 1) / 2
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    return low + (high - low) * (position - math.floor(position))


def confidence_shares(teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(share of samples, share of classes) at or below the median teacher confidence: the samples'
    max softmax, the classes' summed softmax over the batch (T = 1, weak view)."""
    p_t = F.softmax(teacher.detach().float(), dim=1)
    confidence, class_confidence = p_t.max(dim=1).values, p_t.sum(dim=0)
    return ((confidence <= median(confidence)).float().mean(),
            (class_confidence <= median(class_confidence)).float().mean())


@fp32
def mlkd_losses(
    student: Tensor, teacher: Tensor, student_strong: Tensor, teacher_strong: Tensor,
    temperatures: tuple[float, ...], standardize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(instance, batch, class) terms, unweighted, each summed over `temperatures`; `standardize`:
    the instance terms compare z-scored logits."""
    teacher, teacher_strong = teacher.detach(), teacher_strong.detach()
    sample_share, class_share = confidence_shares(teacher)
    weak, strong = ((standardized(a), standardized(b)) if standardize else (a, b)
                    for a, b in ((student, teacher), (student_strong, teacher_strong)))
    instance = sum(sample_share * instance_kl(*weak, t).mean() + instance_kl(*strong, t).mean() for t in temperatures)
    batch = sum(sample_share * batch_alignment(student, teacher, t) for t in temperatures)
    classes = sum(class_share * class_alignment(student, teacher, t) for t in temperatures)
    return instance, batch, classes


@register_method
class MLKD(Method):
    name = "mlkd"
    reference = ("Jin et al. CVPR 2023, sec. 3 (instance, batch (eq. 6) and class (eq. 7) alignment over "
                 "temperatures 2-6, confidence masking, a strongly augmented view)")
    options = {
        "mlkd_weight": (1.0, "weight of the instance, batch and class terms (the authors' 0.9 is alpha 0.9 here)"),
        "mlkd_strong_ce_weight": (0.111, "weight of the strong view's cross-entropy (the authors' 0.1 at "
                                         "alpha 0.9: 0.1 / 0.9)"),
        "mlkd_standardize": (False, "z-score the instance terms' logits (Sun et al. 2024; published with "
                                    "--temperature 2, mlkd_weight 10)"),
    }
    inputs = frozenset({STRONG_VIEW})
    mlkd_weight: float
    mlkd_strong_ce_weight: float
    mlkd_standardize: bool

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int, *,
                student_strong: Features, teacher_strong: Features) -> dict[str, Tensor]:
        temperatures = (self.temperature, *EXTRA_TEMPERATURES)
        instance, batch, classes = mlkd_losses(student[-1], teacher[-1], student_strong[-1], teacher_strong[-1],
                                               temperatures, self.mlkd_standardize)
        strong_ce = F.cross_entropy(student_strong[-1].float(), targets)
        return {
            "loss_mlkd_instance": self.mlkd_weight * instance,
            "loss_mlkd_batch": self.mlkd_weight * batch,
            "loss_mlkd_class": self.mlkd_weight * classes,
            "loss_mlkd_ce_strong": self.mlkd_strong_ce_weight * strong_ce,
        }
