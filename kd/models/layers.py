"""Pieces the CIFAR model families share: conv + BN (+ ReLU) units, the field's initialisation, channel shuffle."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(
    in_planes: int, planes: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (padding keeps the size at stride 1, no bias: BN follows) + BN, then ReLU unless `relu` is False."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(planes),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def init_field_weights(model: nn.Module, linear_std: float | None = None) -> nn.Module:
    """The reference CIFAR models' initialisation: every conv He-normal over fan-out (their
    normal(0, sqrt(2 / (k*k*out)))), conv biases zero; with `linear_std`, linear layers normal(0,
    linear_std) with zero bias (VGG, MobileNetV2: 0.01). BN keeps PyTorch's (1, 0), as theirs.

    A model built on the meta device (`ModelInfo.parameter_count`) has no values to initialise, and
    normal_ on meta tensors imports torch._dynamo (seconds), so it is left as built."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
    return model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: (N, g*c, H, W) -> interleave the g groups channel by channel."""
    n, channels, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)
