"""The field's CIFAR models: the reference's exact parameter counts for 100 classes, and a forward
giving the stage features and logits at 32x32 RGB (CIFAR) and 28x28 grayscale (Fashion-MNIST).

Where the counts come from: HobbitLong/RepDistiller at commit b84f547 (models/*.py; mdistiller's
models/cifar/*.py are the same layers), each model built with num_classes=100 from its `model_dict`
name (in the comments) and its parameters summed, p.numel() over model.parameters(). Two checks by
hand: ResNet8x4 = 3*3*3*32 + 64 (stem conv, BN) + 1x1 32->64 projection + BN 2,048 + 128
+ 1 block per stage (64: 73,984; 128: 221,952 + 8,448; 256: 886,272 + 33,280) + fc 256*100 + 100
= 1,233,540; VGG8 = five conv(bias)+BN layers 1,792+128, 73,856+256, 295,168+512, 1,180,160+1,024,
2,359,808+1,024 + fc 51,300 = 3,965,028.
"""

from __future__ import annotations

import pytest
import torch

from kd.models import MODELS, create_model

PARAMS_100 = {
    "ResNet8": 83_892,  # resnet8
    "ResNet20": 278_324,  # resnet20
    "ResNet32": 472_756,  # resnet32
    "ResNet56": 861_620,  # resnet56
    "ResNet110": 1_736_564,  # resnet110
    "ResNet8x4": 1_233_540,  # resnet8x4
    "ResNet32x4": 7_433_860,  # resnet32x4
    "ResNet50": 23_705_252,  # ResNet50 (models/resnetv2.py)
    "WRN16_1": 180_916,  # wrn_16_1
    "WRN16_2": 703_284,  # wrn_16_2
    "WRN40_1": 569_780,  # wrn_40_1
    "WRN40_2": 2_255_156,  # wrn_40_2
    "VGG8": 3_965_028,  # vgg8 (= vgg8_bn)
    "VGG11": 9_277_284,  # vgg11 (= vgg11_bn)
    "VGG13": 9_462_180,  # vgg13 (= vgg13_bn)
    "VGG16": 14_774_436,  # vgg16 (= vgg16_bn)
    "VGG19": 20_086_692,  # vgg19 (= vgg19_bn)
    "MobileNetV2": 812_836,  # MobileNetV2 (= mobile_half)
    "ShuffleNetV1": 949_258,  # ShuffleV1
    "ShuffleNetV2": 1_355_528,  # ShuffleV2
}

# Per stage feature: channels, and the map's side at 32 and at 28 pixels (the reference's f1 ... fN at
# 32; at 28 every stride-2 layer rounds up, a 2x2 max-pool down). The thin ResNets: tests/test_models.py.
RESNET = ((32, 28), (16, 14), (8, 7))
VGG = ((16, 14), (8, 7), (4, 3), (4, 3))
SHUFFLE = ((16, 14), (8, 7), (4, 4))
STAGES = {
    "ResNet8x4": ((64, 128, 256), RESNET),
    "ResNet32x4": ((64, 128, 256), RESNET),
    "ResNet50": ((256, 512, 1024, 2048), (*RESNET, (4, 4))),
    "WRN16_1": ((16, 32, 64), RESNET),
    "WRN16_2": ((32, 64, 128), RESNET),
    "WRN40_1": ((16, 32, 64), RESNET),
    "WRN40_2": ((32, 64, 128), RESNET),
    **{name: ((128, 256, 512, 512), VGG) for name in ("VGG8", "VGG11", "VGG13", "VGG16", "VGG19")},
    "MobileNetV2": ((12, 16, 48, 160), ((16, 14), (8, 7), (4, 4), (2, 2))),
    "ShuffleNetV1": ((240, 480, 960), SHUFFLE),
    "ShuffleNetV2": ((116, 232, 464), SHUFFLE),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-2 forwards gain nothing from threads; on CI's 2 shared cores extra ones only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(PARAMS_100))
def test_parameter_count_for_100_classes_is_the_references(name: str) -> None:
    assert MODELS[name].parameter_count(100) == PARAMS_100[name]  # what `kd models` lists (meta device)


@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)], ids=["cifar", "fashion"])
def test_forward_gives_stage_features_and_logits(name: str, channels: int, size: int) -> None:
    model = create_model(name, 100, channels, size).eval()
    if channels == 3:  # the weights really built, not only their meta-device count
        assert sum(p.numel() for p in model.parameters()) == PARAMS_100[name]
    with torch.no_grad():
        *features, logits = model(torch.randn(2, channels, size, size))
    widths, sides = STAGES[name]
    side = [pair[0 if size == 32 else 1] for pair in sides]
    assert [tuple(f.shape) for f in features] == [(2, c, s, s) for c, s in zip(widths, side, strict=True)]
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


def test_every_field_model_says_what_it_reproduces() -> None:
    for name in PARAMS_100:
        assert "RepDistiller" in MODELS[name].reference, name
        assert MODELS[name].family, name
