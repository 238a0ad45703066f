"""Models by name (timm-style): add a model by decorating its constructor with @register_model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# A constructor takes (num_classes, in_channels, image_size) and returns a module whose
# forward gives [stage features..., logits].
Constructor = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Constructor
    description: str


MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, description: str) -> Callable[[Constructor], Constructor]:
    def add(build: Constructor) -> Constructor:
        MODELS[name] = ModelInfo(name, build, description)
        return build

    return add


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return MODELS[name].build(num_classes, in_channels, image_size)
