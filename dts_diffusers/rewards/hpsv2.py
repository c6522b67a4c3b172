"""HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, prompt).

open_clip is an optional dependency (`pip install "dts-diffusers[hpsv2]"`; in ComfyUI, which ships torchvision, or a
clone, `pip install open_clip_torch`), imported only when this reward is built.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .hub import bad_file_error, read_state_dict, resolve_file, short_cause
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize

HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "the 'hpsv2' reward needs open_clip. In ComfyUI, or for a cloned pack, run in its environment: pip install "
            "open_clip_torch (it needs torchvision: ComfyUI has it; elsewhere install the torchvision that matches "
            "your torch first, or pip replaces torch). An installed package: pip install 'dts-diffusers[hpsv2]'"
        ) from err
    return open_clip


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's eval transform (`ResizeMaxSize`): fit the long side to `size`, then zero-pad to a centred square.

    Unlike CLIP's resize-and-crop nothing is cut off a non-square image. HPSv2 resizes the float tensor (after
    `ToTensor`) with torchvision's bicubic, antialiased and unclamped, which is what `F.interpolate` does here.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
        )
    pad_height, pad_width = size - new_height, size - new_width
    return F.pad(images, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2))


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
        pixels = normalize(resize_longest_side_and_pad(images.float(), self.image_size), self.mean, self.std)
        image_features = self.model.encode_image(pixels.to(self.dtype), normalize=True).float()
        return (image_features * self.text_embeddings(prompts)).sum(-1)


def hpsv2_from_open_clip(model: nn.Module, model_name: str = "ViT-H-14") -> HPSv2:
    """Wrap an open_clip model: input size from its vision tower, and the OpenAI mean/std HPSv2 normalises with."""
    open_clip = import_open_clip()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
    return HPSv2(model, open_clip.get_tokenizer(model_name), int(image_size), mean, std)


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
    source = {
        "reward": "hpsv2",
        "repo_id": HPSV2_REPO,
        "filename": HPSV2_FILE,
        "argument": "pretrained_model_name_or_path",
    }
    state = read_state_dict(path, unwrap="state_dict", **source)
    model = open_clip.create_model(model_name, pretrained=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing, unexpected or misshapen keys
        problem = f"its tensors are not an open_clip {model_name} ({short_cause(error)})"
        raise bad_file_error(path, problem, **source) from None
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return hpsv2_from_open_clip(model, model_name)
