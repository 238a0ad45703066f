"""Training augmentation on batches of uint8 tensors, on whatever device they live.

Random crop with zero padding and horizontal flip, as in the thesis's torchvision transforms
(`RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`), but for a whole batch in one gather.
The random draws come from a CPU generator that the caller owns, so the same seed gives the
same batches on the CPU and on the GPU, solo or packed, before or after a resume. The same holds
for the strongly augmented second view a method may ask for (`strong_view`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-image crop offsets (n, 2) in [0, 2*padding] and flip flags (n,), drawn on the CPU."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Apply the drawn crops and flips to uint8 images (N, C, H, W) with one gather."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1, None]  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    return (images.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# The strong view's operations: a batched subset of RandAugment(2, 10) + Cutout, the second view of
# MLKD (Jin et al. 2023, whose code applies FixMatch's RandAugment on top of crop and flip).
COLOUR_RANGE = (0.1, 1.9)  # RandAugment's range of the brightness and contrast enhancement factors
CUTOUT_MAX = 0.5  # the side of the cut-out square, as a fraction of the image side: uniform in [0, 0.5]
CUTOUT_FILL = 127  # the mid-grey the cut-out square is filled with


@dataclass(frozen=True)
class StrongDraws:
    """Per-image draws of the strong view (n images): its own crop and flip, brightness and contrast
    factors, and a cut-out square (top-left corner and side in pixels)."""

    offsets: Tensor  # (n, 2) int64
    flips: Tensor  # (n,) bool
    colour: Tensor  # (n, 2) float32: brightness, contrast
    cutout: Tensor  # (n, 3) int64: row, column, side

    def select(self, idx: Tensor) -> StrongDraws:
        return StrongDraws(self.offsets[idx], self.flips[idx], self.colour[idx], self.cutout[idx])


def draw_strong(n: int, padding: int, flip: bool, size: int, generator: torch.Generator) -> StrongDraws:
    """The strong view's draws for n images, on the CPU from the caller's generator."""
    offsets, flips = draw_crop_flip(n, padding, flip, generator)
    low, high = COLOUR_RANGE
    colour = low + (high - low) * torch.rand(n, 2, generator=generator)
    side = (CUTOUT_MAX * size * torch.rand(n, generator=generator)).long()
    corner = (torch.rand(n, 2, generator=generator) * (size - side[:, None] + 1)).long()
    return StrongDraws(offsets, flips, colour, torch.cat([corner, side[:, None]], dim=1))


def strong_view(images: Tensor, draws: StrongDraws, padding: int) -> Tensor:
    """uint8 (N, C, H, W) -> the strongly augmented uint8 view: crop and flip, brightness (scale
    towards black), contrast (blend with each image's mean grey level, as PIL's ImageEnhance), then
    a mid-grey square cut out."""
    out = crop_flip(images, draws.offsets, draws.flips, padding).float()
    colour = draws.colour.to(images.device)
    brightness, contrast = colour[:, 0, None, None, None], colour[:, 1, None, None, None]
    out = out * brightness
    grey = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (grey + contrast * (out - grey)).clamp(0, 255).round()
    cutout = draws.cutout.to(images.device)
    rows = torch.arange(images.shape[2], device=images.device)[None, :]
    cols = torch.arange(images.shape[3], device=images.device)[None, :]
    top, left, side = cutout[:, 0, None], cutout[:, 1, None], cutout[:, 2, None]
    inside_rows = (rows >= top) & (rows < top + side)  # (N, H)
    inside_cols = (cols >= left) & (cols < left + side)  # (N, W)
    inside = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]  # (N, 1, H, W)
    return torch.where(inside, float(CUTOUT_FILL), out).to(torch.uint8)
