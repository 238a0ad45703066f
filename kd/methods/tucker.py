"""Tucker-decomposition distillation: match the normalised HOSVD core tensors of feature maps.

An adaptation (this suite's, after the user's design) of SVD-based feature distillation (Lee,
Kim, Song 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition") to
the higher-order SVD of De Lathauwer, De Moor, Vandewalle 2000: for each mode n the factor U_n
is the leading r_n left singular vectors of the mode-n unfolding, and the core is
G = X x_1 U_1^T x_2 U_2^T ... . Mode `full` decomposes each stage's whole batch, an
N x C x H x W tensor; mode `sample` decomposes every sample's C x H x W tensor. The loss per
stage pair is ||G_s/||G_s|| - G_t/||G_t|| ||^2 (mean over samples in `sample` mode), summed over
the paired stages.

Choices:
- Each network is decomposed in its own bases with the same ranks, so the cores have equal
  shape even when the channel counts differ; no connector is needed. (Stages are paired from
  the deepest down and spatial sizes matched by pooling, as in the other feature methods.)
- Singular vectors are only defined up to sign: each is flipped so its largest-magnitude entry
  is positive, or the cores could not be compared.
- The factors are computed under no_grad (eigh of each unfolding's Gram matrix, fp32) and
  treated as constants; gradients flow only through the linear core projection. SVD/eigh
  gradients are NaN for repeated singular values (e.g. all-zero features); a projection has
  finite gradients for any input.
- Not CUDA-graph capturable: torch.linalg.eigh checks its error codes on the host (a sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.methods.base import Features, Method, Shapes, at_least, one_of, register_method
from kd.methods.features import fp32, stage_pairs, unit

MODES = ("full", "sample")


def leading_eigenvectors(gram: Tensor, rank: int) -> Tensor:
    """(B, d, d) symmetric PSD -> (B, d, rank) eigenvectors of the largest eigenvalues (the
    leading left singular vectors of the unfolding), each signed so its largest-magnitude entry
    is positive."""
    vectors = torch.linalg.eigh(gram).eigenvectors.flip(-1)[..., :rank]
    peak = vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True))
    return vectors * torch.where(peak >= 0, 1.0, -1.0)


def hosvd_factors(x: Tensor, ranks: list[int]) -> list[Tensor]:
    """Factor matrices (B, d_n, r_n) of x: (B, d_1, ..., d_k), batched over its first dim."""
    factors = []
    for mode, rank in enumerate(ranks, start=1):
        unfolded = x.movedim(mode, -1).reshape(x.shape[0], -1, x.shape[mode])  # mode-n unfolding^T
        factors.append(leading_eigenvectors(unfolded.transpose(1, 2) @ unfolded, rank))
    return factors


def project(x: Tensor, factors: list[Tensor]) -> Tensor:
    """The core x x_1 U_1^T ... x_k U_k^T, batched over the first dim."""
    core = x
    for mode, u in enumerate(factors, start=1):
        moved = core.movedim(mode, -1)
        flat = moved.reshape(moved.shape[0], -1, moved.shape[-1]) @ u
        core = flat.reshape(*moved.shape[:-1], u.shape[-1]).movedim(-1, mode)
    return core


def tucker_core(x: Tensor, ranks: list[int]) -> Tensor:
    """HOSVD core of x (B, d_1, ..., d_k) with the factors held constant (no gradient through them)."""
    with torch.no_grad():
        factors = hosvd_factors(x, ranks)
    return project(x, factors)


@fp32
def tucker_loss(student: Tensor, teacher: Tensor, ranks: list[int], mode: str) -> Tensor:
    """Squared distance of the L2-normalised cores of two (N, C, H, W) maps.

    `ranks` are (batch, channel, height, width) for `full`, (channel, height, width) for
    `sample`; each is clipped to the dimension sizes of both maps.
    """
    s, t = student.float(), teacher.detach().float()
    if mode == "full":
        s, t = s.unsqueeze(0), t.unsqueeze(0)
    ranks = [min(r, a, b) for r, a, b in zip(ranks, s.shape[1:], t.shape[1:], strict=True)]
    core_s = unit(tucker_core(s, ranks).flatten(1), dim=1)
    with torch.no_grad():
        core_t = unit(tucker_core(t, ranks).flatten(1), dim=1)
    return (core_s - core_t).pow(2).sum(1).mean()


@register_method
class Tucker(Method):
    name = "tucker"
    reference = (
        "adaptation of Lee et al. 2018 (KD via SVD) to the HOSVD of De Lathauwer et al. 2000: "
        "||G_s/||G_s|| - G_t/||G_t|| ||^2 of Tucker cores"
    )
    options = {
        "tucker_mode": (
            "full",
            "decompose the whole batch N x C x H x W ('full') or each sample C x H x W ('sample')",
        ),
        "tucker_batch_rank": (16, "Tucker rank of the batch mode ('full' only)"),
        "tucker_channel_rank": (8, "Tucker rank of the channel mode"),
        "tucker_spatial_rank": (4, "Tucker rank of each spatial mode (height and width)"),
        "tucker_weight": (1.0, "weight of the summed per-stage core distances"),
    }
    rules = {"tucker_mode": one_of(*MODES), "tucker_batch_rank": at_least(1), "tucker_channel_rank": at_least(1),
             "tucker_spatial_rank": at_least(1)}
    not_capturable = "torch.linalg.eigh checks its result on the host"
    tucker_mode: str
    tucker_batch_rank: int
    tucker_channel_rank: int
    tucker_spatial_rank: int
    tucker_weight: float

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, **options) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        self.ranks = [self.tucker_channel_rank, self.tucker_spatial_rank, self.tucker_spatial_rank]
        if self.tucker_mode == "full":
            self.ranks = [self.tucker_batch_rank, *self.ranks]

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        pairs = stage_pairs(student, teacher)
        total = sum(tucker_loss(s, t, self.ranks, self.tucker_mode) for s, t in pairs)
        return {"loss_tucker": self.tucker_weight * total}
