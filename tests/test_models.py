"""Registered models: output shapes, parameter counts, ViT feature taps and pretrained loading."""

from __future__ import annotations

import pytest
import torch
from test_models_field import STAGES as FIELD_STAGES  # the field's models: their shapes are tested there
from timm.models.vision_transformer import VisionTransformer

from kd.models import MODELS, create_model
from kd.models.vit import NO_WEIGHTS, build_vit, load_pretrained_vit_tiny, pretrained_source

THIN = ("ResNet8", "ResNet20", "ResNet32", "ResNet56", "ResNet110", "ResNet112")
# Channels of each feature map, for every registered model (the ViT taps are 192-d tokens).
WIDTHS = {
    **{name: (16, 32, 64) for name in THIN},
    "ResNet18": (64, 128, 256, 512),
    "ResNet8w": (64, 128, 256, 512),
    "ViTTiny": (192, 192, 192),
    "ViTTiny224": (192, 192, 192),
    "ViTStudent": (192, 192, 192),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_covered() -> None:
    assert set(MODELS) == set(WIDTHS) | set(FIELD_STAGES)


@pytest.mark.parametrize("name", sorted(WIDTHS))
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 8)], ids=["cifar", "digits"])
def test_output_shapes(name: str, channels: int, size: int) -> None:
    model = create_model(name, 10, channels, size).eval()
    with torch.no_grad():
        *feats, logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats] == list(WIDTHS[name])
    if name.startswith("ViT"):  # one token per patch: an 8x8 grid at either size (timm's 14x14 at 224)
        expected = [(14, 14) if name == "ViTTiny224" else (8, 8)] * 3
    else:  # stride-1 stem, then every later stage halves the map
        expected = [(size >> i, size >> i) for i in range(len(feats))]
    assert [tuple(f.shape[2:]) for f in feats] == expected


@pytest.mark.parametrize(
    "name, params",
    [
        # He et al. (2016, table 6) quote 0.85M for ResNet-56 and 1.7M for ResNet-110; the user's
        # ResNet112 is the same network. Their shortcuts are parameter-free (option A): our 1x1 conv
        # projections add a few thousand parameters, still within those rounded figures.
        ("ResNet56", 855_770),
        ("ResNet110", 1_730_714),
        ("ResNet112", 1_730_714),
        ("ResNet18", 11_173_962),  # the usual CIFAR ResNet-18 figure, 11.17M
        ("ResNet8w", 4_903_242),
        ("ViTTiny", 5_362_762),  # 5.7M in timm at 224 with 1000 classes; fewer tokens and classes here
        ("ViTStudent", 2_693_578),
        ("ViTTiny224", 5_526_346),  # timm's vit_tiny_patch16_224 (5,717,416) less 990 head classes x 193
    ],
)
def test_parameter_counts_cifar10(name: str, params: int) -> None:
    assert n_params(create_model(name, 10, 3, 32)) == params


def test_vit_student_is_about_half_the_teacher() -> None:
    ratio = n_params(create_model("ViTStudent", 10)) / n_params(create_model("ViTTiny", 10))
    assert 0.49 < ratio < 0.51


def test_vit_depth_width_and_patch_are_options() -> None:
    model = build_vit(10, 3, 32, depth=9, embed_dim=96, heads=2, patch_size=8).eval()
    with torch.no_grad():
        *taps, logits = model(torch.randn(2, 3, 32, 32))
    assert len(model.blocks) == 9
    assert [tuple(t.shape) for t in taps] == [(2, 96, 4, 4)] * 3
    assert logits.shape == (2, 10)
    with pytest.raises(ValueError, match="depth >= 3"):
        build_vit(10, 3, 32, depth=2, embed_dim=96, heads=2)


def test_vit_taps_are_block_outputs_and_logits_are_timms() -> None:
    model = create_model("ViTStudent", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        *taps, logits = model(x)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        blocks_out = []
        for block in model.blocks:
            tokens = block(tokens)
            blocks_out.append(tokens)
        timm_logits = VisionTransformer.forward(model, x)
    for tap, after in zip(taps, (blocks_out[1], blocks_out[3], blocks_out[5]), strict=True):
        grid = after[:, 1:].transpose(1, 2).reshape(2, 192, 8, 8)  # drop the class token
        torch.testing.assert_close(tap, grid)
    torch.testing.assert_close(logits, timm_logits)


def test_load_pretrained_file_round_trip(tmp_path) -> None:
    path = tmp_path / "vit_tiny.pth"
    torch.save(create_model("ViTTiny", 10).state_dict(), path)
    model = create_model("ViTTiny", 10)
    load_pretrained_vit_tiny(model, str(path))
    saved = torch.load(path, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_load_timm_patch16_checkpoint_resamples_pos_embed_and_keeps_head(tmp_path) -> None:
    path = tmp_path / "vit_tiny_224.pth"
    imagenet = build_vit(1000, 3, 224, depth=12, embed_dim=192, heads=3, patch_size=16)  # timm's layout
    torch.save(imagenet.state_dict(), path)
    model = build_vit(10, 3, 64, depth=12, embed_dim=192, heads=3, patch_size=16)
    head = model.head.weight.clone()
    load_pretrained_vit_tiny(model, str(path))
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, imagenet.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.head.weight, head)


def test_load_mismatching_patch_size_names_the_fix(tmp_path) -> None:
    path = tmp_path / "vit_tiny_224.pth"
    torch.save(build_vit(1000, 3, 224, depth=12, embed_dim=192, heads=3, patch_size=16).state_dict(), path)
    with pytest.raises(ValueError, match=r"patch embedding .* build the model with patch_size=16"):
        load_pretrained_vit_tiny(create_model("ViTTiny", 10), str(path))


def test_pretrained_source() -> None:
    assert pretrained_source(None, online=False) == NO_WEIGHTS
    assert NO_WEIGHTS == "no pretrained weights: training ViT-Tiny from scratch (pass --teacher-weights FILE)"
    assert "w.pth" in pretrained_source("w.pth", online=False)
    assert "timm hub" in pretrained_source(None, online=True)
