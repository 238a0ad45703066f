"""Model registry: `create_model(name, num_classes, in_channels, image_size)`."""

from kd.models import mobilenetv2, resnet, resnet_cifar, shufflenet, vgg, vit, wrn  # noqa: F401  (registration)
from kd.models.registry import MODELS, ModelInfo, create_model, register_model

__all__ = ["MODELS", "ModelInfo", "create_model", "register_model"]
