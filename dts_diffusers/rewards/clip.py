"""CLIP-family rewards on transformers' `CLIPModel`: CLIP score, PickScore and the LAION aesthetic predictor v2.

Each loads its model once, caches normalised text embeddings per prompt, and preprocesses tensors on the reward's
device with the resize / crop / mean / std read from the processor's `preprocessor_config.json`.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from .base import Reward
from .heads import preference_mlp
from .hub import bad_file_error, load_pretrained, read_json_config, read_state_dict, resolve_file, short_cause
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def _read_image_processing(
    processor_dir: str, *, argument: str, reward: str, repo_id: str, local_files_only: bool
) -> dict:
    """Resize size, crop size, mean and std from a CLIP `preprocessor_config.json` (old int or new dict layouts)."""
    filename = "preprocessor_config.json"
    path = resolve_file(processor_dir, filename, argument=argument, reward=reward, local_files_only=local_files_only)
    source = {"reward": reward, "repo_id": repo_id, "filename": filename, "argument": argument}
    config = read_json_config(path, **source)
    size, crop = config.get("size", 224), config.get("crop_size", 224)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = crop.get("height") if isinstance(crop, dict) else crop
    mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
    numbers = (int, float)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, crop)) or not all(
        isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(x, numbers) for x in v) for v in (mean, std)
    ):
        raise bad_file_error(
            path,
            f"its size / crop_size must be pixel counts and image_mean / image_std three numbers each (got size="
            f"{size!r}, crop_size={crop!r}, image_mean={mean!r}, image_std={std!r})",
            **source,
        )
    return {"size": size, "crop": crop, "mean": tuple(mean), "std": tuple(std)}


def _load_clip(
    model_path: str | os.PathLike,
    processor_path: str | os.PathLike,
    *,
    reward: str,
    device,
    dtype,
    local_files_only: bool,
    model_repo: str,
    processor_repo: str,
    model_argument: str = "pretrained_model_name_or_path",
    processor_argument: str = "pretrained_model_name_or_path",
):
    """`model_repo` / `processor_repo`: where good copies come from, named in the errors for damaged files."""
    common = {"reward": reward, "local_files_only": local_files_only}
    model = load_pretrained(
        CLIPModel.from_pretrained, model_path, filename="model.safetensors", argument=model_argument,
        repo_id=model_repo, **common,
    )  # fmt: skip
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, processor_path, filename="tokenizer.json", argument=processor_argument,
        repo_id=processor_repo, **common,
    )  # fmt: skip
    processing = _read_image_processing(
        os.fspath(processor_path), argument=processor_argument, repo_id=processor_repo, **common
    )
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return model, tokenizer, processing


class ClipEmbeddingReward(Reward):
    """Shared machinery: image embeddings from tensors, text embeddings cached per prompt (both L2-normalised)."""

    def __init__(self, model: CLIPModel, tokenizer, processing: dict, name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.processing = processing
        self.name = name
        self._text_cache: dict[str, torch.Tensor] = {}

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        p = self.processing
        pixels = clip_preprocess(images, p["size"], p["crop"], p["mean"], p["std"], dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            max_length = self.model.config.text_config.max_position_embeddings
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                pooled = self.model.text_model(
                    input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
                ).pooler_output
                features = nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, features, strict=True))
        return torch.stack([self._text_cache[p].to(self.device) for p in prompts])


class ClipScore(ClipEmbeddingReward):
    """`logit_scale * cos(image, prompt)`: 100 x cosine similarity for OpenAI CLIP, the usual "CLIP score"."""

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        scale = self.model.logit_scale.float().exp()
        return scale * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


class AestheticScore(ClipEmbeddingReward):
    """LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (roughly 1-10)."""

    needs_prompts = False

    def __init__(self, model: CLIPModel, tokenizer, processing: dict, head: nn.Module):
        super().__init__(model, tokenizer, processing, name="aesthetic")
        self.head = head

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        embeddings = self.image_embeddings(images)
        return self.head(embeddings.to(self.head[0].weight.dtype))[:, 0]


def load_aesthetic_head(path: str) -> nn.Sequential:
    """Load `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.N.*`, or `N.*` when saved from a bare Sequential)."""
    source = {"reward": "aesthetic", "repo_id": AESTHETIC_REPO, "filename": AESTHETIC_FILE}
    state = read_state_dict(path, argument="pretrained_model_name_or_path", **source)
    state = {key.removeprefix("layers."): value for key, value in state.items()}
    first = state.get("0.weight")
    if first is None or first.ndim != 2:
        problem = "it has no 2-d first-layer weight (layers.0.weight); it is not the aesthetic MLP"
        raise bad_file_error(path, problem, argument="pretrained_model_name_or_path", **source)
    head = preference_mlp(first.shape[1])
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing, unexpected or misshapen keys
        problem = f"its tensors are not the aesthetic MLP's ({short_cause(error)})"
        raise bad_file_error(path, problem, argument="pretrained_model_name_or_path", **source) from None
    return head.eval().requires_grad_(False)


def load_clip_score(
    device=None,
    dtype=None,
    pretrained_model_name_or_path: str | os.PathLike = CLIP_L14,
    local_files_only: bool = False,
) -> ClipScore:
    """CLIP score with OpenAI CLIP ViT-L/14 (or any `CLIPModel` repo / directory with its tokenizer and processor)."""
    model, tokenizer, processing = _load_clip(
        pretrained_model_name_or_path,
        pretrained_model_name_or_path,
        reward="clip",
        device=device,
        dtype=dtype,
        local_files_only=local_files_only,
        model_repo=CLIP_L14,
        processor_repo=CLIP_L14,
    )
    return ClipScore(model, tokenizer, processing, name="clip")


def load_pickscore(
    device=None,
    dtype=None,
    pretrained_model_name_or_path: str | os.PathLike = PICKSCORE,
    processor_name_or_path: str | os.PathLike = PICKSCORE_PROCESSOR,
    local_files_only: bool = False,
) -> ClipScore:
    """PickScore v1: a CLIP-H fine-tuned on Pick-a-Pic preferences, with the LAION CLIP-H tokenizer and processor."""
    model, tokenizer, processing = _load_clip(
        pretrained_model_name_or_path,
        processor_name_or_path,
        reward="pickscore",
        device=device,
        dtype=dtype,
        local_files_only=local_files_only,
        model_repo=PICKSCORE,
        processor_repo=PICKSCORE_PROCESSOR,
        processor_argument="processor_name_or_path",
    )
    return ClipScore(model, tokenizer, processing, name="pickscore")


def load_aesthetic(
    device=None,
    dtype=None,
    pretrained_model_name_or_path: str | os.PathLike = AESTHETIC_REPO,
    clip_model_name_or_path: str | os.PathLike = CLIP_L14,
    local_files_only: bool = False,
) -> AestheticScore:
    """LAION aesthetic v2: MLP weights `sac+logos+ava1-l14-linearMSE.pth` (repo, directory or file) on CLIP-L/14."""
    head_path = resolve_file(
        pretrained_model_name_or_path,
        AESTHETIC_FILE,
        argument="pretrained_model_name_or_path",
        reward="aesthetic",
        local_files_only=local_files_only,
    )
    model, tokenizer, processing = _load_clip(
        clip_model_name_or_path,
        clip_model_name_or_path,
        reward="aesthetic",
        device=device,
        dtype=dtype,
        local_files_only=local_files_only,
        model_repo=CLIP_L14,
        processor_repo=CLIP_L14,
        model_argument="clip_model_name_or_path",
        processor_argument="clip_model_name_or_path",
    )
    head = load_aesthetic_head(head_path).to(device=device, dtype=dtype)
    return AestheticScore(model, tokenizer, processing, head)
