"""JPEG (in)compressibility (DDPO): the size of the image encoded as JPEG at quality 95, in kilobytes.

A prompt-free, model-free reward that is cheap to evaluate, which makes it the standard toy objective for testing
reward steering. It has no gradient.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image [B, 3, H, W] in [0, 1] saved as an 8-bit RGB JPEG."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward(Reward):
    needs_prompts = False
    supports_gradients = False

    def __init__(self, sign: float, quality: int = 95):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100] (got {quality}); DDPO uses 95")
        self.sign = sign
        self.quality = quality
        self.name = "jpeg-compressibility" if sign < 0 else "jpeg-incompressibility"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


def load_jpeg_compressibility(device=None, dtype=None, quality: int = 95) -> JpegReward:
    """-(JPEG size in kB): higher for simpler, smoother images. `device`/`dtype` are ignored (it runs on the CPU)."""
    return JpegReward(-1.0, quality)


def load_jpeg_incompressibility(device=None, dtype=None, quality: int = 95) -> JpegReward:
    """+(JPEG size in kB): higher for busier, more detailed images."""
    return JpegReward(1.0, quality)
