"""Model registry: `create_model(name, num_classes, in_channels, image_size)`."""

from kd.models import resnet, resnet_cifar, vit  # noqa: F401  (registration)
from kd.models.registry import MODELS, ModelInfo, create_model, register_model

__all__ = ["MODELS", "ModelInfo", "create_model", "register_model"]
