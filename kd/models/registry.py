"""Models by name (timm-style): add a model by decorating its constructor with @register_model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# A constructor takes (num_classes, in_channels, image_size) and returns a module whose
# forward gives [stage features..., logits].
Constructor = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """A registered model and what it is: its family and the paper or code its architecture follows."""

    name: str
    build: Constructor
    description: str
    family: str
    reference: str

    def parameter_count(self, num_classes: int = 100, in_channels: int = 3, image_size: int = 32) -> int:
        """Counted on the meta device, so listing every model allocates and initialises no weights."""
        with torch.device("meta"):
            model = self.build(num_classes, in_channels, image_size)
        return sum(p.numel() for p in model.parameters())


MODELS: dict[str, ModelInfo] = {}


def register_model(
    name: str, description: str, *, family: str, reference: str
) -> Callable[[Constructor], Constructor]:
    def add(build: Constructor) -> Constructor:
        MODELS[name] = ModelInfo(name, build, description, family, reference)
        return build

    return add


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return MODELS[name].build(num_classes, in_channels, image_size)
