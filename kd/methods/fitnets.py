"""FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

A connector (regressor) maps the student's guided stage onto the shape of the teacher's hint
stage and is trained with the student; the loss is the MSE between the two. Unlike the paper's
two-stage recipe (hint pre-training, then KD), the hint term is trained jointly with CE, as in
RepDistiller's benchmark.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import Features, Method, Shapes, at_least, register_method
from kd.methods.features import check_stage, fp32


@fp32
def fitnets_loss(projected: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error between the connector's output and the teacher's hint, in fp32."""
    return F.mse_loss(projected.float(), hint.detach().float())


class Connector(nn.Module):
    """3x3 conv (stride = spatial ratio) + BN from (Cs, Hs, Ws) to (Ct, Ht, Wt).

    A stride that does not land exactly on the hint's size (non-integer ratio, or a smaller
    guided map) is finished by adaptive average pooling.
    """

    def __init__(self, guided: tuple[int, int, int], hint: tuple[int, int, int]) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = guided, hint
        stride = max(hs // ht, 1)
        self.conv = nn.Conv2d(cs, ct, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(ct)
        out = ((hs - 1) // stride + 1, (ws - 1) // stride + 1)
        self.pool = nn.AdaptiveAvgPool2d((ht, wt)) if out != (ht, wt) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.conv(x)))


@register_method
class FitNets(Method):
    name = "fitnets"
    reference = "Romero et al. 2015, FitNets, eq. 3 (hint loss 1/2 ||u_h - r(v_g)||^2, here as a mean)"
    options = {
        "hint_stage": (2, "teacher stage (1-based) whose output is the hint"),
        "guided_stage": (1, "student stage (1-based) that the connector maps onto the hint"),
        "fitnets_weight": (100.0, "weight of the hint MSE (RepDistiller's beta for FitNets)"),
    }
    rules = {"hint_stage": at_least(1), "guided_stage": at_least(1)}  # and at most the models' stages
    hint_stage: int
    guided_stage: int
    fitnets_weight: float

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, **options) -> None:
        super().__init__(student_shapes, teacher_shapes, **options)
        self.hint_index = check_stage("hint_stage", self.hint_stage, teacher_shapes, "teacher")
        self.guided_index = check_stage("guided_stage", self.guided_stage, student_shapes, "student")
        guided, hint = student_shapes[self.guided_index], teacher_shapes[self.hint_index]
        self.connector = Connector(tuple(guided), tuple(hint))

    def forward(self, student: Features, teacher: Features, targets: Tensor, epoch: int) -> dict[str, Tensor]:
        projected = self.connector(student[self.guided_index])
        return {"loss_fitnets": self.fitnets_weight * fitnets_loss(projected, teacher[self.hint_index])}
