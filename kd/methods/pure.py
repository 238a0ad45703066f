"""No distillation: cross-entropy (with the recipe's label smoothing) only."""

from __future__ import annotations

from torch import Tensor

from kd.methods.base import Features, Method, register_method


@register_method
class Pure(Method):
    name = "pure"
    reference = "baseline (teachers and students trained without a teacher)"

    def forward(
        self, student: Features, teacher: Features | None, targets: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        return {}
