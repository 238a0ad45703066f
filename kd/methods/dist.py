"""DIST (Huang, You, Wang, Qian, Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

Instead of KL's exact match, the student keeps the teacher's relations between predictions,
measured by Pearson correlation rho of the softened probabilities Y = softmax(z / T) (N x K):
- inter-class: for each sample i, rho between its rows Y^s_i and Y^t_i (how the sample ranks the
  classes), L_inter = T^2 (1 - mean_i rho(Y^s_i,:, Y^t_i,:));
- intra-class: for each class k, rho between the columns Y^s_:,k and Y^t_:,k (how the class ranks
  the samples of the batch), L_intra = T^2 (1 - mean_k rho(Y^s_:,k, Y^t_:,k));
and the loss is beta L_inter + gamma L_intra (sec. 3, with the distance d_p(u, v) = 1 - rho_p(u, v)).

rho(u, v) = unit(u - mean u) . unit(v - mean v): a vector without variation (a collapsed
student's uniform row, a class column of a batch of duplicates) has no relations and counts as
rho = 0 with a zero gradient (the authors' eps 1e-8 in the denominator gives the same value, but a
0/0 gradient where the norm is 0).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Features, Method, register_method
from kd.methods.features import fp32, unit


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """(N, K), (N, K) -> (N,): Pearson correlation of each row of a with the same row of b."""
    return (unit(a - a.mean(dim=1, keepdim=True), dim=1) * unit(b - b.mean(dim=1, keepdim=True), dim=1)).sum(1)


@fp32
def dist_losses(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(L_inter, L_intra), each T^2 (1 - mean Pearson correlation), unweighted."""
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * temperature**2, intra * temperature**2


@register_method
class DIST(Method):
    name = "dist"
    reference = "Huang et al. NeurIPS 2022, sec. 3 (beta L_inter + gamma L_intra, Pearson distance of softmax(z/T))"
    options = {
        "dist_inter_weight": (2.0, "weight beta of the inter-class relation term (paper's CIFAR-100: 2)"),
        "dist_intra_weight": (2.0, "weight gamma of the intra-class relation term (paper's CIFAR-100: 2)"),
    }
    dist_inter_weight: float
    dist_intra_weight: float

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        inter, intra = dist_losses(student[-1], teacher[-1], self.temperature)
        return {"loss_dist_inter": self.dist_inter_weight * inter, "loss_dist_intra": self.dist_intra_weight * intra}
