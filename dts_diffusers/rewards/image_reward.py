"""ImageReward (Xu et al. 2023) as a self-contained port that runs on today's torch and transformers.

The reference package no longer imports with transformers 5 (its BLIP text encoder imports
`transformers.modeling_utils.apply_chunking_to_forward`), needs OpenAI's `clip`, and pins `timm==0.6.13`. The model is
small enough to port exactly: a BLIP ViT (timm layout, pre-norm), a BERT encoder whose layers cross-attend to the image
tokens, and an MLP on the [CLS] feature, normalised by fixed constants. Module names follow the checkpoint, so the key
map is a prefix rename plus an explicit list of keys the score never uses; loading asserts that nothing else is left
over or missing. `scripts/check_image_reward_equivalence.py` checks it against the reference code.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .heads import preference_mlp
from .hub import bad_file_error, load_pretrained, read_json_config, read_state_dict, resolve_file, short_cause
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

IMAGE_REWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
SAFETENSORS_FILE = "ImageReward.safetensors"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_REPO = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
VIT_HEAD_DIM = 64  # BLIP's ViT-B (768/12) and ViT-L (1024/16) both use 64-wide heads; the weights do not store it.

# reference key prefix -> module of this port
KEY_PREFIXES = {"blip.visual_encoder.": "vision.", "blip.text_encoder.": "text.", "mlp.layers.": "head."}
# keys of the reference checkpoint that the score does not use (BLIP's contrastive projections, a BERT buffer)
UNUSED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT: [CLS] + patch tokens + learned positions, pre-norm blocks, final LayerNorm; returns all tokens."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, width))
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, key_width: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(key_width, width)
        self.value = nn.Linear(key_width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(context)), heads(self.value(context)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(x.shape)


class BertResidualOutput(nn.Module):
    """Linear, then LayerNorm of (output + residual): BERT's post-norm `*Output` modules."""

    def __init__(self, in_width: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, key_width: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(width, num_heads, key_width)
        self.output = BertResidualOutput(width, width, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: dict, encoder_width: int):
        super().__init__()
        width, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
        self.attention = BertAttention(width, heads, width, eps)
        self.crossattention = BertAttention(width, heads, encoder_width, eps)
        self.intermediate = BertIntermediate(width, config["intermediate_size"])
        self.output = BertResidualOutput(config["intermediate_size"], width, eps)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        width = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], width, padding_idx=config.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], width)
        self.LayerNorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertEncoder(nn.Module):
    def __init__(self, config: dict, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, encoder_width) for _ in range(config["num_hidden_layers"]))


class TextEncoder(nn.Module):
    """BLIP's BERT in 'multimodal' mode: self-attention over the prompt, cross-attention to the image tokens."""

    def __init__(self, config: dict, encoder_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, encoder_width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor):
        x = self.embeddings(input_ids)
        text_mask = attention_mask[:, None, None, :].bool()
        for layer in self.encoder.layer:
            x = layer(x, text_mask, image_tokens)
        return x


class ImageRewardModel(nn.Module):
    """Image tokens from the ViT, prompt [CLS] after cross-attention, MLP head, then the reference normalisation."""

    def __init__(self, med_config: dict, vision: dict):
        super().__init__()
        self.vision = VisionTransformer(**vision)
        self.text = TextEncoder(med_config, vision["width"])
        width = med_config["hidden_size"]
        self.head = preference_mlp(width)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixels)
        features = self.text(input_ids, attention_mask, image_tokens)[:, 0]
        return (self.head(features)[:, 0].float() - REWARD_MEAN) / REWARD_STD


def vision_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """The ViT's shape from its weights (ViT-L/16 at 224 px for the official checkpoint)."""
    prefix = "blip.visual_encoder."
    width, _, patch_size, _ = state_dict[prefix + "patch_embed.proj.weight"].shape
    tokens = state_dict[prefix + "pos_embed"].shape[1]
    depth = 1 + max(int(key[len(prefix) :].split(".")[1]) for key in state_dict if key.startswith(prefix + "blocks."))
    return {
        "image_size": round((tokens - 1) ** 0.5) * patch_size,
        "patch_size": patch_size,
        "width": width,
        "depth": depth,
        "num_heads": width // VIT_HEAD_DIM,
        "mlp_hidden": state_dict[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
    }


def map_reference_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys to this port's; fail on any key that is neither mapped nor known to be unused."""
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS:
            continue
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            mapped[KEY_PREFIXES[prefix] + key[len(prefix) :]] = value
    if unknown:
        raise ValueError(f"unexpected keys in the ImageReward checkpoint (not an ImageReward.pt?): {unknown[:8]}")
    return mapped


def build_image_reward_model(state_dict: dict[str, torch.Tensor], med_config: dict) -> ImageRewardModel:
    """Instantiate the port for these weights and load them strictly (no missing, no unexpected keys)."""
    model = ImageRewardModel(med_config, vision_config_from_state_dict(state_dict))
    result = model.load_state_dict(map_reference_keys(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"ImageReward checkpoint does not match the port: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model


MED_CONFIG_INTS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
    "vocab_size",
)  # fmt: skip


def image_reward_source(filename: str, argument: str = "pretrained_model_name_or_path") -> dict:
    """Where a good copy of an ImageReward file comes from, for the errors on damaged files."""
    return {"reward": "image-reward", "repo_id": IMAGE_REWARD_REPO, "filename": filename, "argument": argument}


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, from safetensors or `torch.load(weights_only=True)`; never runs code from the file."""
    return read_state_dict(
        path, **image_reward_source(CHECKPOINT_FILE)
    )  # a converted .safetensors is remade from a good .pt


def convert_to_safetensors(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> str:
    """One-time conversion of `ImageReward.pt` to safetensors (used keys only), written atomically."""
    from safetensors.torch import save_file

    state_dict = read_checkpoint(os.fspath(checkpoint_path))
    map_reference_keys(state_dict)  # validate before writing anything
    kept = {k: v.contiguous() for k, v in state_dict.items() if k not in UNUSED_KEYS}
    output_path = os.fspath(output_path)
    directory = os.path.dirname(os.path.abspath(output_path))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        temp_path = handle.name
    try:
        save_file(kept, temp_path)
        os.replace(temp_path, output_path)
    except BaseException:
        os.unlink(temp_path)
        raise
    return output_path


class ImageReward(Reward):
    """ImageReward v1.0: human-preference score of an image for a prompt (about N(0, 1) over generated images)."""

    name = "image-reward"

    def __init__(self, model: ImageRewardModel, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._token_cache: dict[str, torch.Tensor] = {}

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            encoded = self.tokenizer(
                missing, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
            )
            pairs = torch.stack([encoded.input_ids, encoded.attention_mask], dim=1)  # [n, 2, MAX_PROMPT_TOKENS]
            self._token_cache.update(zip(missing, pairs, strict=True))
        tokens = torch.stack([self._token_cache[p] for p in prompts]).to(self.device)
        return tokens[:, 0], tokens[:, 1]

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        size = self.model.vision.image_size
        pixels = clip_preprocess(images, size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, dtype=self.dtype)
        return self.model(pixels, *self.tokens(prompts))


def load_bert_tokenizer(path: str | os.PathLike, local_files_only: bool):
    """`bert-base-uncased` with BLIP's two added special tokens ([DEC], [ENC]), as the reference builds it."""
    from transformers import BertTokenizer

    tokenizer = load_pretrained(
        BertTokenizer.from_pretrained,
        path,
        filename="vocab.txt",
        argument="tokenizer_name_or_path",
        reward="image-reward",
        repo_id=TOKENIZER_REPO,
        local_files_only=local_files_only,
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_image_reward(
    device=None,
    dtype=None,
    pretrained_model_name_or_path: str | os.PathLike = IMAGE_REWARD_REPO,
    tokenizer_name_or_path: str | os.PathLike = TOKENIZER_REPO,
    med_config: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> ImageReward:
    """Load ImageReward from the hub repo, a directory (ImageReward.safetensors or .pt + med_config.json) or a file.

    The reference package is never imported: the checkpoint is read with `torch.load(weights_only=True)`.
    """
    path = os.fspath(pretrained_model_name_or_path)
    common = {"argument": "pretrained_model_name_or_path", "reward": "image-reward"}
    common["local_files_only"] = local_files_only
    local_safetensors = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isdir(path) and os.path.isfile(local_safetensors):
        checkpoint = local_safetensors
    else:
        checkpoint = resolve_file(path, CHECKPOINT_FILE, **common)
    if med_config is None:
        sibling = os.path.join(os.path.dirname(checkpoint), MED_CONFIG_FILE)
        med_config = sibling if os.path.isfile(sibling) else resolve_file(path, MED_CONFIG_FILE, **common)
    config = read_json_config(
        med_config,
        positive_ints=MED_CONFIG_INTS,
        positive_numbers=("layer_norm_eps",),
        **image_reward_source(MED_CONFIG_FILE, "med_config"),
    )
    state_dict = read_checkpoint(checkpoint)
    try:
        model = build_image_reward_model(state_dict, config)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:  # keys absent, unknown, or misshapen tensors
        problem = f"its tensors do not fit ImageReward with this med_config.json ({short_cause(error)})"
        raise bad_file_error(checkpoint, problem, **image_reward_source(CHECKPOINT_FILE)) from None
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return ImageReward(model, load_bert_tokenizer(tokenizer_name_or_path, local_files_only))
