"""Vision Transformers (timm) for the ViT-Tiny -> 6-layer ViT plan, with CNN-like feature taps.

`forward` returns `[tap1, tap2, tap3, logits]`: the outputs of the blocks at 1/3, 2/3 and all of the
depth, patch tokens only (class token dropped) laid out as an (N, embed_dim, H/patch, W/patch) grid,
so the feature methods (FitNets, attention transfer, NST) treat them like CNN stage maps. Depth and
width are options of `build_vit`; the registry's constructors are fixed presets of it.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from kd.models.registry import register_model

NO_WEIGHTS = "no pretrained weights: training ViT-Tiny from scratch (pass --teacher-weights FILE)"
TIMM_VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


class TappedViT(VisionTransformer):
    """timm's VisionTransformer (same state_dict keys, so timm checkpoints load) returning feature taps."""

    def forward(self, x: Tensor) -> list[Tensor]:
        depth = len(self.blocks)
        final, taps = self.forward_intermediates(x, indices=[depth * k // 3 - 1 for k in (1, 2, 3)])
        return [*taps, self.forward_head(final)]


def build_vit(
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int,
    embed_dim: int,
    heads: int,
    patch_size: int | None = None,
) -> TappedViT:
    """A ViT whose patch size defaults to image_size // 8 (an 8x8 token grid: patch 4 at 32, 1 at 8)."""
    if depth < 3:
        raise ValueError(f"ViT depth {depth} gives fewer than 3 distinct feature taps: use depth >= 3")
    return TappedViT(
        img_size=image_size,
        patch_size=patch_size or max(1, image_size // 8),
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
    )


@register_model("ViTTiny", "ViT-Tiny teacher: 12 blocks, 192-d, 3 heads, patch image_size // 8")
def vit_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_vit(num_classes, in_channels, image_size, depth=12, embed_dim=192, heads=3)


@register_model("ViTStudent", "ViT student: 6 blocks, 192-d, 3 heads, patch image_size // 8")
def vit_student(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_vit(num_classes, in_channels, image_size, depth=6, embed_dim=192, heads=3)


def load_pretrained_vit_tiny(model: VisionTransformer, path: str) -> None:
    """Load a local timm ViT-Tiny state_dict into `model` (nothing is downloaded).

    The position embeddings are resampled to the model's token grid. The patch embedding cannot be
    resampled, so the model must use the checkpoint's patch size: for timm's patch-16 checkpoints
    (trained at 224) build `build_vit(..., image_size=224, patch_size=16)` and resize inputs to 224.
    A head with another number of classes is not loaded (the model keeps its fresh head).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    theirs, ours = state["patch_embed.proj.weight"].shape, own["patch_embed.proj.weight"].shape
    if theirs != ours:
        raise ValueError(
            f"{path}: patch embedding {tuple(theirs)} does not fit the model's {tuple(ours)}: build the model "
            f"with patch_size={theirs[-1]}, in_channels={theirs[1]} (patch 16: image_size=224, resize inputs)"
        )
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens
    )
    if state["head.weight"].shape != own["head.weight"].shape:
        state["head.weight"], state["head.bias"] = own["head.weight"], own["head.bias"]
    model.load_state_dict(state)


def pretrained_source(path: str | None, online: bool) -> str:
    """One log line saying where the ViT-Tiny teacher's starting weights come from."""
    if path:
        return f"pretrained weights: {path}"
    if online:
        return f"pretrained weights: timm hub {TIMM_VIT_TINY} (patch 16: image_size=224, resize inputs)"
    return NO_WEIGHTS
