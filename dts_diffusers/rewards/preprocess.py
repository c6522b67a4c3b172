"""Image preprocessing on tensors, on the reward's device: resize the short side, center crop, normalise.

Matches the PIL pipelines of CLIP/BLIP (`Resize(size, BICUBIC)`, `CenterCrop(size)`, `Normalize`) without a PIL round
trip: bicubic with antialiasing (PIL always antialiases when it shrinks), clamped to [0, 1] as PIL's uint8 output is,
and torchvision's crop offsets. Computed in float32 and differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (the long side as torchvision computes it: int(size * long / short))."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    if short == size:
        return images
    new_long = int(size * long / short)
    new_size = (size, new_long) if height <= width else (new_long, size)
    return F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from {height}x{width}; resize first")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    crop: int | None = None,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised [B, 3, crop, crop] (crop defaults to size) in `dtype` (the model's)."""
    pixels = normalize(center_crop(resize_short_side(images.float(), size), crop or size), mean, std)
    return pixels.to(dtype or images.dtype)
