"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020, "Contrastive
Representation Distillation"; the authors' code: RepDistiller, crd/).

The pooled last-stage features of both networks are embedded (linear layer, L2-normalised, 128-d)
and each sample's student embedding is contrasted with the teacher's: the positive is the
teacher's memory slot of the same sample, the negatives K slots of other classes' samples
(the authors' "exact" sampling), and the other way round. Each score is exp(<v, m> / tau) / Z, with
Z fixed at the first batch; the loss is the NCE estimate of the paper's critic (sec. 3.2, eq. 18 of
the authors' code): a score is taken as coming from the data with probability h = P / (P + K/N).
The memory banks (one slot per training sample and network) follow the embeddings with momentum.

Negatives are drawn by a counter-based hash of (the run's salt, the step, the sample's index, k):
no generator state beside the step counter, the same negatives solo or packed, before or after a
resume, and no host work, so the step can be captured in a CUDA graph. Banks, Z, salt and step
counter are buffers: the checkpoint carries them and a resume continues bit-exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.errors import SpecError
from kd.methods.base import INDEX, Features, Method, Rule, Shapes, at_least, positive, register_method
from kd.methods.features import fp32, pooled_embedding, unit

NCE_EPS = 1e-7  # the authors' eps in h = P / (P + K/N + eps)
MASK32 = 0xFFFFFFFF
# Odd multipliers below 2^31, so that a 32-bit value times one never overflows int64 (lowbias32's
# shifts; its second multiplier is above 2^31 and is replaced by another odd constant).
MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)
GOLDEN = 0x9E3779B1  # spreads consecutive counters (k, the step) over 32 bits before mixing


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of int64 values (taken mod 2^32), elementwise, on any device."""
    x = x & MASK32
    for multiplier in MULTIPLIERS:
        x = ((x ^ (x >> 16)) * multiplier) & MASK32
    return x ^ (x >> 16)


def other_class_samples(
    keys: Tensor, targets: Tensor, by_class: Tensor, class_start: Tensor, class_count: Tensor
) -> Tensor:
    """Each anchor's negatives: for hash values `keys` (B, K), samples uniformly (with replacement)
    among the training samples whose class differs from the anchor's `targets` (B,). `by_class` lists
    the training indices sorted by class; class c occupies [class_start[c], + class_count[c])."""
    start, count = class_start[targets][:, None], class_count[targets][:, None]
    position = keys % (by_class.numel() - count)  # among the others, in class order, skipping c's block
    return by_class[position + count * (position >= start)]


@fp32
def contrast_scores(anchor: Tensor, memory: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """exp(<m_j, v_i> / tau) for each anchor v_i (B, D) and its candidates' memory slots j (B, K+1)."""
    slots = memory[candidates].float()  # (B, K+1, D), a constant: the memory takes no gradient
    return torch.exp(torch.bmm(slots, anchor.float().unsqueeze(2)).squeeze(2) / temperature)


@fp32
def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """The NCE loss of normalised scores P (B, K+1), the positive first (the authors' ContrastLoss,
    "eq. 18"): -(1/B) sum_i [log h(P_i0) + sum_k log(1 - h(P_ik))], h(P) = P / (P + K/N + eps)."""
    noise = (scores.shape[1] - 1) / n_data  # K times the uniform noise probability 1/N
    positive, negative = scores[:, 0], scores[:, 1:]
    log_data = torch.log(positive / (positive + noise + NCE_EPS))
    log_noise = torch.log(noise / (negative + noise + NCE_EPS))
    return -(log_data.sum() + log_noise.sum()) / scores.shape[0]


@torch.no_grad()
def momentum_update(memory: Tensor, index: Tensor, embedding: Tensor, momentum: float) -> None:
    """m_i <- unit(momentum * m_i + (1 - momentum) * v_i) for the batch's samples, in place."""
    moved = memory[index] * momentum + embedding.detach().float() * (1 - momentum)
    memory.index_copy_(0, index, unit(moved, dim=1))


class Embed(nn.Module):
    """The authors' embedding head: a linear map of the pooled features, L2-normalised."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, dim)

    def forward(self, features: Tensor) -> Tensor:
        return unit(self.linear(pooled_embedding(features)), dim=1)


def momentum_rule() -> Rule:
    return (lambda v: 0 <= v < 1), "in [0, 1)"


@register_method
class CRD(Method):
    name = "crd"
    reference = ("Tian et al. ICLR 2020, sec. 3 (contrastive objective with a memory bank; NCE loss, "
                 "h = P / (P + K/N))")
    options = {
        "crd_weight": (0.8, "weight of the contrastive term (the authors' beta: 0.8, with CE weight 1)"),
        "crd_negatives": (16384, "negatives K per anchor, drawn from other classes (must be below the "
                                 "training set's size)"),
        "crd_nce_temperature": (0.07, "temperature tau of the scores exp(<v, m> / tau)"),
        "crd_momentum": (0.5, "momentum of the memory banks' update"),
        "crd_embed_dim": (128, "dimension of the L2-normalised embeddings"),
    }
    rules = {"crd_negatives": at_least(1), "crd_nce_temperature": positive(), "crd_momentum": momentum_rule(),
             "crd_embed_dim": at_least(1)}
    inputs = frozenset({INDEX})
    crd_weight: float
    crd_negatives: int
    crd_nce_temperature: float
    crd_momentum: float
    crd_embed_dim: int

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, train_labels: Tensor | None = None,
                 **options) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        if train_labels is None:
            raise SpecError("crd keeps a memory slot per training sample: build it for a run (its training labels)")
        n = len(train_labels)
        if self.crd_negatives >= n:
            raise SpecError(f"crd option crd_negatives={self.crd_negatives} is not below the {n} training "
                            f"images: pass --crd-negatives {n - 1} or less (16384 is for CIFAR's 50000)")
        labels = train_labels.long().cpu()
        self.embed_student = Embed(student_shapes[-2][0], self.crd_embed_dim)
        self.embed_teacher = Embed(teacher_shapes[-2][0], self.crd_embed_dim)
        bound = 1 / math.sqrt(self.crd_embed_dim / 3)  # the authors' uniform init of the banks
        for bank in ("memory_student", "memory_teacher"):
            self.register_buffer(bank, torch.rand(n, self.crd_embed_dim) * 2 * bound - bound)
        self.register_buffer("normaliser", torch.full((2,), -1.0))  # Z of the student's, the teacher's scores
        self.register_buffer("salt", torch.randint(0, 2**31, ()))  # from the run's seed (seeded build)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))  # training steps taken
        count = torch.bincount(labels)
        # Facts of the training set, rebuilt with the method: not part of its state.
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)

    def negatives(self, index: Tensor, targets: Tensor) -> Tensor:
        """(B, K) negatives for this step: a hash of (salt, step, index, k), of other classes."""
        step = mix32(self.salt + self.draws * GOLDEN)
        per_sample = mix32(step ^ mix32(index))[:, None]
        k = torch.arange(self.crd_negatives, device=index.device) * GOLDEN
        return other_class_samples(mix32(per_sample + k), targets, self.by_class, self.class_start,
                                   self.class_count)

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int, *,
                index: Tensor) -> dict[str, Tensor]:
        v_s, v_t = self.embed_student(student[-2]), self.embed_teacher(teacher[-2].detach())
        candidates = torch.cat([index[:, None], self.negatives(index, targets)], dim=1)
        tau, n = self.crd_nce_temperature, self.memory_student.shape[0]
        scores_s = contrast_scores(v_s, self.memory_teacher, candidates, tau)  # the student's anchors
        scores_t = contrast_scores(v_t, self.memory_student, candidates, tau)  # the teacher's anchors
        with torch.no_grad():  # Z = N * the first batch's mean score, then fixed (the authors')
            first = torch.stack([scores_s.mean(), scores_t.mean()]) * n
            self.normaliser.copy_(torch.where(self.normaliser < 0, first, self.normaliser))
        loss = nce_loss(scores_s / self.normaliser[0], n) + nce_loss(scores_t / self.normaliser[1], n)
        if self.training:
            momentum_update(self.memory_student, index, v_s, self.crd_momentum)
            momentum_update(self.memory_teacher, index, v_t, self.crd_momentum)
            self.draws.add_(1)
        return {"loss_crd": self.crd_weight * loss}
