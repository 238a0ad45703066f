"""Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

Activation-based spatial attention: Q = mean over channels of |f|^p, flattened over space and
L2-normalised per sample. Per stage pair the loss is mean over batch and positions of
(Q_s/||Q_s|| - Q_t/||Q_t||)^2, the squared form used by the authors' code and by RepDistiller /
mdistiller (the paper's eq. 2 writes the unsquared p-norm). Stages are summed by default.
"""

from __future__ import annotations

from torch import Tensor

from kd.methods.base import Features, Method, one_of, positive, register_method
from kd.methods.features import fp32, stage_pairs, unit

REDUCTIONS = ("sum", "mean")


def attention_map(feature: Tensor, p: float) -> Tensor:
    """(N, C, H, W) -> (N, H*W): channel mean of |f|^p, L2-normalised over positions, fp32."""
    return unit(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


@fp32
def at_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """Mean squared difference of the two normalised attention maps (equal spatial sizes)."""
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean()


@register_method
class AttentionTransfer(Method):
    name = "attention_transfer"
    label = "at"  # as its term, loss_at
    reference = "Zagoruyko & Komodakis 2017, eq. 2 (beta/2 sum_j ||Q_s/||Q_s|| - Q_t/||Q_t|| ||, squared as in their code)"
    options = {
        "at_p": (2.0, "exponent p of the attention map mean_c |f_c|^p"),
        "at_weight": (1000.0, "weight beta of the summed per-stage losses (RepDistiller / mdistiller: 1000)"),
        "at_reduction": ("sum", "combine the stage losses by 'sum' (paper) or 'mean'"),
    }
    rules = {"at_p": positive(), "at_reduction": one_of(*REDUCTIONS)}
    at_p: float
    at_weight: float
    at_reduction: str

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        losses = [at_loss(s, t, self.at_p) for s, t in stage_pairs(student, teacher)]
        total = sum(losses) if self.at_reduction == "sum" else sum(losses) / len(losses)
        return {"loss_at": self.at_weight * total}
