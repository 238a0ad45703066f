"""Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer").

Each channel's spatial map is a sample of the network's "selectivity" distribution; the student
matches the teacher's distribution by minimising the squared MMD between the two sets of
L2-normalised channel maps with the polynomial kernel k(x, y) = (x . y + c)^d, d = 2, c = 0:
MMD^2 = mean k(s, s') + mean k(t, t') - 2 mean k(s, t), per sample, averaged over the batch.
Channel counts may differ; spatial sizes are matched by average-pooling the larger map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.methods.base import Features, Method, register_method
from kd.methods.features import fp32, stage_pairs, unit


def _kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over channel pairs and batch of the polynomial kernel (a_i . b_j)^2."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


@fp32
def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared MMD between normalised channel maps of (N, Cs, H, W) and (N, Ct, H, W), fp32."""
    s = unit(student.float().flatten(2), dim=2)
    with torch.no_grad():
        t = unit(teacher.float().flatten(2), dim=2)
        teacher_term = _kernel_mean(t, t)
    return _kernel_mean(s, s) + teacher_term - 2 * _kernel_mean(s, t)


@register_method
class NST(Method):
    name = "nst"
    reference = "Huang & Wang 2017, sec. 3 (MMD^2 of normalised channel maps, polynomial kernel d = 2, c = 0)"
    options = {"nst_weight": (50.0, "weight of the summed per-stage MMD^2 (RepDistiller: 50)")}
    nst_weight: float

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        return {"loss_nst": self.nst_weight * sum(nst_loss(s, t) for s, t in stage_pairs(student, teacher))}
