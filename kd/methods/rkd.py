"""Relational knowledge distillation (Park, Kim, Lu, Cho 2019, "Relational Knowledge Distillation").

On the pooled embeddings e (global average pool of the last stage) of a batch:
- distance: pairwise Euclidean distances, each divided by its own network's mean distance mu over
  all pairs i != j (eq. 3; a sample repeated in the batch is a pair at distance 0), compared with
  the Huber (smooth L1) loss. A collapsed network (every embedding equal, mu = 0) has no distance
  structure: its normalised distances are all 0, so the term is the Huber cost of the teacher's
  normalised distances, finite and the same for every collapsed student. (The authors'
  `d[d > 0].mean()` leaves repeated samples out of mu, and with every sample equal divides the
  floor by itself: the weighted term jumped to 2.2e7 with zero gradient.)
- angle: cos of the angle at e_j between (e_i - e_j) and (e_k - e_j) for every triplet (i, j, k),
  compared with the Huber loss; degenerate triplets (i = j or k = j) count as cos 0
  on both sides, as in the authors' code.

Collapse guard: d/dx sqrt(x) is infinite at x = 0 (the diagonal, identical samples), which once
turned every update into NaN (and under AMP into silently skipped steps). Distances here are
sqrt(max(d^2, eps)) with the diagonal masked by multiplication, and the angle's unit vectors
are 0 (with a zero gradient) for identical samples, so every gradient is finite and bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Features, Method, register_method
from kd.methods.features import EPS, fp32, pooled_embedding, unit


def pairwise_distances(e: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances with a zero diagonal and finite gradients everywhere."""
    n = e.shape[0]
    squared = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)
    off_diagonal = 1.0 - torch.eye(n, device=e.device, dtype=e.dtype)
    return squared.clamp_min(EPS).sqrt() * off_diagonal


def normalised_distances(e: Tensor) -> Tensor:
    """Distances divided by their mean over all pairs i != j (0 for identical samples), as mask
    arithmetic: no data-dependent shape, so a CUDA graph can capture it. All 0 when every sample is
    the same (mu = 0): a collapsed network has no distance structure to compare."""
    n = e.shape[0]
    d = pairwise_distances(e)
    d = d * (d > EPS**0.5).to(d.dtype)  # identical samples sit at exactly sqrt(EPS): they are at 0
    mu = d.sum() / max(n * (n - 1), 1)
    return d / mu.clamp_min(EPS)  # mu = 0 only if d is all 0, and then 0 / EPS = 0


def triplet_cosines(e: Tensor) -> Tensor:
    """(N, D) -> (N, N, N): [j, i, k] = cos of the angle at e_j between e_i - e_j and e_k - e_j."""
    diff = unit(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = unit(e_i - e_j), 0 if e_i = e_j
    return diff @ diff.transpose(1, 2)


@fp32
def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between the two networks' normalised distance matrices (fp32 embeddings)."""
    with torch.no_grad():
        target = normalised_distances(teacher.float())
    return F.smooth_l1_loss(normalised_distances(student.float()), target)


@fp32
def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between the two networks' triplet angle cosines (fp32 embeddings)."""
    with torch.no_grad():
        target = triplet_cosines(teacher.float())
    return F.smooth_l1_loss(triplet_cosines(student.float()), target)


@register_method
class RKD(Method):
    name = "rkd"
    reference = "Park et al. 2019, sec. 3.2 (distance-wise and angle-wise potentials, Huber loss)"
    options = {
        "rkd_distance_weight": (25.0, "weight of the distance-wise term (paper: 25)"),
        "rkd_angle_weight": (50.0, "weight of the angle-wise term (paper: 50)"),
    }
    rkd_distance_weight: float
    rkd_angle_weight: float

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        s, t = pooled_embedding(student[-2]), pooled_embedding(teacher[-2].detach())
        return {
            "loss_rkd_distance": self.rkd_distance_weight * rkd_distance_loss(s, t),
            "loss_rkd_angle": self.rkd_angle_weight * rkd_angle_loss(s, t),
        }
