"""Factor transfer (Kim, Park, Kwak 2018, "Paraphrasing Complex Network: Network Compression via
Factor Transfer").

Stage 1: a paraphraser (conv encoder to k * C_t "factor" channels, conv-transpose decoder back)
learns to reconstruct the frozen teacher's last-stage features (L2 reconstruction loss), then is
frozen. Stage 2: a translator (conv encoder) on the student's last stage is trained with the
student so that its factors match the teacher's: L1 distance between the L2-normalised,
flattened factors (the paper's p = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import Features, Method, Shapes, at_least, register_method
from kd.methods.features import fp32, match_spatial, unit

# Paraphraser optimiser. Adam rather than the authors' SGD (lr 0.1): the reconstruction target is
# the teacher's raw last-stage features, whose scale depends on the teacher, and SGD at a fixed lr
# diverged to NaN on some teachers here; Adam's step does not depend on that scale.
PRETRAIN_LR = 1e-3
# Factor channels per teacher channel: the paper's and kd's rate is 0.5; a rate far above a few is a typo
# whose paraphraser does not fit in memory (1e6 on a ResNet asks for 147 GB).
MAX_FT_RATE = 8.0


@fp32
def ft_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """Mean absolute difference of the per-sample L2-normalised flattened factors, in fp32."""
    s = unit(student_factor.float().flatten(1), dim=1)
    t = unit(teacher_factor.detach().float().flatten(1), dim=1)
    return (s - t).abs().mean()


def _conv_stack(channels: list[int], conv: type[nn.Module], batch_norm: bool) -> nn.Sequential:
    """3x3 stride-1 convs (size-preserving) between consecutive channel counts, each + LeakyReLU."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers.append(conv(c_in, c_out, 3, 1, 1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher features -> factors -> reconstruction. No BN, so a frozen one is mode-independent."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels], nn.Conv2d, False)
        self.decoder = _conv_stack(
            [factor_channels, factor_channels, channels, channels], nn.ConvTranspose2d, False
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


@register_method
class FactorTransfer(Method):
    name = "factor_transfer"
    label = "ft"  # as its term, loss_ft
    reference = (
        "Kim et al. 2018, sec. 3 (paraphraser reconstruction; FT loss || F_T/||F_T|| - F_S/||F_S|| ||_1)"
    )
    options = {
        "ft_rate": (0.5, "paraphrase rate k: factor channels = k * teacher last-stage channels"),
        "ft_pretrain_epochs": (30, "epochs of paraphraser pre-training on the frozen teacher"),
        "ft_weight": (500.0, "weight beta of the factor loss (the authors' code: 500)"),
    }
    rules = {"ft_rate": ((lambda v: 0 < v <= MAX_FT_RATE), f"in (0, {MAX_FT_RATE:g}]"),
             "ft_pretrain_epochs": at_least(0)}
    pretrain_artifact = "paraphraser.pth"
    ft_rate: float
    ft_pretrain_epochs: int
    ft_weight: float

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, **options) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        c_s, c_t = student_shapes[-2][0], teacher_shapes[-2][0]
        factor_channels = max(1, round(c_t * self.ft_rate))
        self.paraphraser = Paraphraser(c_t, factor_channels)
        # Frozen from the start (requires_grad is not saved in a state_dict, so a restored
        # paraphraser must already be frozen); only `pretrain` trains it.
        self.paraphraser.requires_grad_(False)
        self.translator = _conv_stack([c_s, c_s, factor_channels, factor_channels], nn.Conv2d, True)

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        s, t = match_spatial(student[-2], teacher[-2].detach())
        teacher_factor = self.paraphraser.encoder(t)
        return {"loss_ft": self.ft_weight * ft_loss(self.translator(s), teacher_factor)}

    def pretrain(
        self,
        teacher: nn.Module,
        batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
        log_metric: Callable[[str, float, int], None],
    ) -> bool:
        """Train the paraphraser to reconstruct the teacher's last stage; log its loss per epoch."""
        teacher.eval()
        params = list(self.paraphraser.parameters())
        optimizer = torch.optim.Adam(params, lr=PRETRAIN_LR)
        self.paraphraser.requires_grad_(True)
        try:
            for epoch in range(1, self.ft_pretrain_epochs + 1):
                total, count = 0.0, 0
                for images, _ in batches():
                    with torch.no_grad():
                        features = teacher(images)[-2].float()
                    loss = F.mse_loss(self.paraphraser(features)[1], features)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, count = total + loss.detach(), count + 1  # no per-batch sync
                log_metric("paraphraser_loss", float(total) / max(count, 1), epoch)
        finally:
            self.paraphraser.requires_grad_(False)
            self.paraphraser.zero_grad(set_to_none=True)
        return True

    def pretrained_module(self) -> nn.Module:
        return self.paraphraser
