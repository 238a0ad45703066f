"""Vision Transformers (timm) for the ViT-Tiny -> 6-layer ViT plan, with CNN-like feature taps.

`forward` returns `[tap1, tap2, tap3, logits]`: the outputs of the blocks at 1/3, 2/3 and all of the
depth, patch tokens only (class token dropped) laid out as an (N, embed_dim, H/patch, W/patch) grid,
so the feature methods (FitNets, attention transfer, NST) treat them like CNN stage maps. Depth and
width are options of `build_vit`; the registry's constructors are fixed presets of it. Inputs of
another size than the model was built for are resized to it, which is how `ViTTiny224` (timm's
patch-16 layout, so timm's pretrained weights fit) takes 32x32 CIFAR images.

timm is imported when a ViT is first built, not with this module: it loads torchvision's models and
torch._dynamo (about 3 s per process), which every CNN run, job and test process would pay.
"""

from __future__ import annotations

import functools
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import TIMM_HUB, SpecError
from kd.models.registry import register_model
from kd.models.weights import fit_state_dict, load_state_dict_file

NO_WEIGHTS = "no pretrained weights: training ViT-Tiny from scratch (pass --teacher-weights FILE)"
TIMM_VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
VIT_REFERENCE = "Dosovitskiy et al. 2021 (ViT), DeiT-Tiny's width (Touvron et al. 2021); timm VisionTransformer"
VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "head.weight", "head.bias")  # read before the state is fit
HUB_PROBE_S = 3.0  # how long the Hugging Face hub may take to accept a connection


@functools.cache
def tapped_vit() -> type[nn.Module]:
    """The class TappedViT: timm's VisionTransformer (same state_dict keys, so timm checkpoints load)
    returning feature taps. Made on first use, so that importing kd does not import timm."""
    from timm.models.vision_transformer import VisionTransformer  # heavy, ViT runs only (module docstring)

    class TappedViT(VisionTransformer):
        def forward(self, x: Tensor) -> list[Tensor]:
            size = tuple(self.patch_embed.img_size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            depth = len(self.blocks)
            final, taps = self.forward_intermediates(x, indices=[depth * k // 3 - 1 for k in (1, 2, 3)])
            return [*taps, self.forward_head(final)]

    return TappedViT


def is_vit(model: nn.Module) -> bool:
    """A model `build_vit` made (no ViT exists before the class does)."""
    return tapped_vit.cache_info().currsize > 0 and isinstance(model, tapped_vit())


def build_vit(
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int,
    embed_dim: int,
    heads: int,
    patch_size: int | None = None,
) -> nn.Module:
    """A ViT whose patch size defaults to image_size // 8 (an 8x8 token grid: patch 4 at 32, 1 at 8)."""
    if depth < 3:
        raise ValueError(f"ViT depth {depth} gives fewer than 3 distinct feature taps: use depth >= 3")
    return tapped_vit()(
        img_size=image_size,
        patch_size=patch_size or max(1, image_size // 8),
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
    )


@register_model("ViTTiny", "ViT-Tiny teacher: 12 blocks, 192-d, 3 heads, patch image_size // 8",
                family="vit", reference=VIT_REFERENCE)
def vit_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_vit(num_classes, in_channels, image_size, depth=12, embed_dim=192, heads=3)


@register_model("ViTStudent", "ViT student: 6 blocks, 192-d, 3 heads, patch image_size // 8",
                family="vit", reference=VIT_REFERENCE)
def vit_student(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_vit(num_classes, in_channels, image_size, depth=6, embed_dim=192, heads=3)


@register_model("ViTTiny224", "ViT-Tiny in timm's layout (patch 16 at 224, inputs resized): takes timm's weights",
                family="vit", reference=VIT_REFERENCE)
def vit_tiny_224(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_vit(num_classes, in_channels, 224, depth=12, embed_dim=192, heads=3, patch_size=16)


def load_pretrained_vit_tiny(model: nn.Module, path: str) -> None:
    """Load a local timm ViT-Tiny state_dict (or a kd best.pth of one) into `model`; nothing is downloaded."""
    load_vit_tiny_state(model, load_state_dict_file(path, "--teacher-weights"), path)


def load_vit_tiny_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Load a timm ViT-Tiny state_dict into `model`; errors are one-line SpecErrors naming `source`.

    The position embeddings are resampled to the model's token grid. The patch embedding cannot be
    resampled, so the model must use the checkpoint's patch size: timm's patch-16 checkpoints (trained
    at 224) fit `ViTTiny224`, which resizes its inputs to 224. A head with another number of classes is
    not loaded (the model keeps its fresh head).
    """
    own = model.state_dict()
    lacking = [key for key in VIT_KEYS if key not in state]
    if lacking:
        raise SpecError(f"{source} is not a ViT state_dict (no {lacking[0]}): pass a timm ViT-Tiny one")
    theirs, ours = state["patch_embed.proj.weight"].shape, own["patch_embed.proj.weight"].shape
    if theirs != ours:
        raise SpecError(
            f"{source}: patch embedding {tuple(theirs)} does not fit the model's {tuple(ours)}: build the model "
            f"with patch_size={theirs[-1]}, in_channels={theirs[1]} (patch 16 at 224: --model ViTTiny224)"
        )
    from timm.layers import resample_abs_pos_embed  # heavy, ViT runs only (module docstring)

    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens
    )
    if state["head.weight"].shape != own["head.weight"].shape:
        state["head.weight"], state["head.bias"] = own["head.weight"], own["head.bias"]
    fit_state_dict(model, state, source, f"ViT of depth {len(model.blocks)} and width {model.embed_dim}")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked (None: it answers), found in seconds: offline, timm's
    download retries for a minute and prints dozens of warnings before it fails."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)  # behind a proxy, the proxy is what must answer
    asked = urlsplit(proxy) if proxy else endpoint
    port = asked.port or (443 if asked.scheme == "https" else 80)
    try:
        socket.create_connection((asked.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError as err:
        return f"{proxy or constants.ENDPOINT} does not answer ({err.strerror or err})"
    return None


def timm_vit_tiny_state() -> dict[str, Tensor]:
    """timm's pretrained ViT-Tiny from the Hugging Face hub, or its local cache when offline."""
    from huggingface_hub import try_to_load_from_cache

    fix = "on an offline machine pass --teacher-weights FILE, saved where the hub is reachable (docs/lab.md)"
    overlay = None
    offline = hub_unreachable()
    if offline:
        cached = try_to_load_from_cache(f"timm/{TIMM_VIT_TINY}", "model.safetensors")
        if not isinstance(cached, str):
            raise SpecError(f"cannot fetch timm's {TIMM_VIT_TINY}: {offline} and the hub cache lacks it: {fix}")
        overlay = {"file": cached}  # timm reads the cached file without asking the hub
    import timm  # heavy, ViT runs only (module docstring)

    try:
        return timm.create_model(TIMM_VIT_TINY, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    except Exception as err:  # no network and no cache: the hub client raises several kinds
        raise SpecError(f"cannot fetch timm's {TIMM_VIT_TINY} ({type(err).__name__}): {fix}") from None


def start_weights(model: nn.Module, init_weights: str | None) -> str | None:
    """Load a teacher's starting weights; returns the line saying where they come from (None: not a ViT)."""
    if not is_vit(model):
        if init_weights:
            raise SpecError(f"{type(model).__name__} is not a ViT: init weights are timm ViT-Tiny checkpoints "
                            f"(drop --teacher-weights {init_weights}, or train ViTTiny224)")
        return None
    if init_weights == TIMM_HUB:
        load_vit_tiny_state(model, timm_vit_tiny_state(), TIMM_VIT_TINY)
        return pretrained_source(None, online=True)
    if init_weights:
        if not Path(init_weights).is_file():
            raise SpecError(f"--teacher-weights {init_weights} does not exist: pass a timm ViT-Tiny state_dict file")
        load_pretrained_vit_tiny(model, init_weights)
    return pretrained_source(init_weights, online=False)


def pretrained_source(path: str | None, online: bool) -> str:
    """One log line saying where the ViT-Tiny teacher's starting weights come from."""
    if path:
        return f"pretrained weights: {path}"
    if online:
        return f"pretrained weights: timm hub {TIMM_VIT_TINY} (patch 16 at 224: ViTTiny224)"
    return NO_WEIGHTS
