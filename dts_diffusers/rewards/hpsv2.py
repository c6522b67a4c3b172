"""HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, prompt).

open_clip is an optional dependency (`pip install "dts-diffusers[hpsv2]"`), imported only when this reward is built.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import Reward
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "the 'hpsv2' reward needs open_clip: pip install 'dts-diffusers[hpsv2]' (or pip install open_clip_torch)"
        ) from err
    return open_clip


class HPSv2(Reward):
    name = "hpsv2"

    def __init__(self, model: nn.Module, tokenizer, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                features = self.model.encode_text(self.tokenizer(missing).to(self.device), normalize=True).float()
            self._text_cache.update(zip(missing, features, strict=True))
        return torch.stack([self._text_cache[p].to(self.device) for p in prompts])

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, self.image_size, self.mean, self.std, dtype=self.dtype)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        return (image_features * self.text_embeddings(prompts)).sum(-1)


def load_hpsv2(
    device=None,
    dtype=None,
    pretrained_model_name_or_path: str | os.PathLike = HPSV2_REPO,
    filename: str = HPSV2_FILE,
    model_name: str = "ViT-H-14",
    local_files_only: bool = False,
) -> HPSv2:
    """HPSv2.1 from the hub repo, a directory holding `HPS_v2.1_compressed.pt`, or that file itself."""
    open_clip = import_open_clip()
    path = resolve_file(
        pretrained_model_name_or_path,
        filename,
        argument="pretrained_model_name_or_path",
        reward="hpsv2",
        local_files_only=local_files_only,
    )
    model = open_clip.create_model(model_name, pretrained=None)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=True)
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
    return HPSv2(model, open_clip.get_tokenizer(model_name), int(image_size), mean, std)
