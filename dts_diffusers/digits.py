"""The bundled tiny digits model: data, prompts, and the two digit classifiers (reward and held-out judge).

`scripts/train_tiny_digits.py` trains a tiny Stable Diffusion pipeline on scikit-learn's 8x8 handwritten digits
(upscaled to 32x32 RGB) and two classifiers on disjoint halves of the same data: the "reward" classifier is what DTS
steers toward, the "judge" is never seen by the sampler and only scores the results. Everything it writes ships inside
the package under `dts_diffusers/assets/`, so the demo runs offline. Only the data functions need scikit-learn, and
they import it when called.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dts_diffusers import defaults

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL_DIR = defaults.BUNDLED_MODEL_DIR
TRAINING_RECORD = ASSETS_DIR / "TRAINING.json"
TRAINING_SCRIPT = "scripts/train_tiny_digits.py"

IMAGE_SIZE = 32
NUM_CLASSES = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERIC_PROMPT = "a handwritten digit"
CLASSIFIER_ROLES = ("reward", "judge")
SPLITS = ("all", "reward", "judge")
SPLIT_SEED = 0


def digit_prompt(digit: int | None) -> str:
    """The training prompt for `digit` ("a handwritten digit seven"), or the generic one for None."""
    if digit is None:
        return GENERIC_PROMPT
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9 or None for the generic prompt (got {digit!r})")
    return f"{GENERIC_PROMPT} {DIGIT_WORDS[int(digit)]}"


def upscale_digits(digits_8x8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] ink values 0..16 -> [N, 3, size, size] in [0, 1]: dark ink on white, gray copied to RGB."""
    ink = digits_8x8.float().unsqueeze(1) / 16.0
    ink = F.interpolate(ink, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return (1.0 - ink).expand(-1, 3, -1, -1).contiguous()


@functools.lru_cache(maxsize=2)
def _all_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data comes from scikit-learn: pip install 'dts-diffusers[benchmarks]' (or scikit-learn)"
        ) from error
    data = load_digits()
    images = upscale_digits(torch.from_numpy(data.images), size)
    return images, torch.from_numpy(data.target).long()


def split_indices(labels: torch.Tensor, seed: int = SPLIT_SEED) -> dict[str, torch.Tensor]:
    """Disjoint, class-balanced halves: "reward" (classifier A) and "judge" (classifier B); "all" is both."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    halves: dict[str, list[torch.Tensor]] = {"reward": [], "judge": []}
    for digit in range(NUM_CLASSES):
        members = order[labels[order] == digit]
        halves["reward"].append(members[: len(members) // 2])
        halves["judge"].append(members[len(members) // 2 :])
    split = {name: torch.cat(parts).sort().values for name, parts in halves.items()}
    split["all"] = torch.arange(len(labels))
    return split


def load_digit_images(split: str = "all", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, size, size] in [0, 1], labels [N]) for `split` in "all", "reward" or "judge"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    images, labels = _all_digits(size)
    index = split_indices(labels)[split]
    return images[index].clone(), labels[index].clone()


def real_digit_images(digit: int, split: str = "all", size: int = IMAGE_SIZE) -> torch.Tensor:
    """All real images of one digit class, e.g. the reference set for FID."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9 (got {digit!r})")
    images, labels = load_digit_images(split, size)
    return images[labels == int(digit)]


class DigitClassifier(nn.Module):
    """A small CNN: images [B, 1 or 3, H, W] in [0, 1] -> logits [B, 10]; color is averaged away, size set to 32."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), feature_dim: int = 64, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.config = {"channels": list(channels), "feature_dim": feature_dim, "image_size": image_size}
        self.image_size = image_size
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU()]
        for c_in, c_out in zip((channels[0], *channels[:-1]), channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W] in [0, 1] (got shape {tuple(images.shape)})")
        gray = images.mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            gray = F.interpolate(gray, size=size, mode="bilinear", align_corners=False, antialias=True)
        return gray * 2.0 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate layer [B, feature_dim]: the space the benchmark computes FID and diversity in."""
        return self.embed(self.convs(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, weights_path: str | os.PathLike) -> None:
        """Write `<name>.safetensors` and its `<name>.json` config, each atomically."""
        weights_path = Path(weights_path)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        _write_atomic(weights_path, lambda tmp: save_file(state, tmp))
        config = json.dumps(self.config, indent=2) + "\n"
        _write_atomic(weights_path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(config))

    @classmethod
    def from_file(cls, weights_path: str | os.PathLike) -> DigitClassifier:
        weights_path = Path(weights_path)
        config_path = weights_path.with_suffix(".json")
        for path in (weights_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"digit classifier file {path} is missing; reinstall dts-diffusers (the files ship in "
                    f"dts_diffusers/assets/) or regenerate them with `python {TRAINING_SCRIPT}`"
                )
        config = json.loads(config_path.read_text())
        model = cls(tuple(config["channels"]), config["feature_dim"], config["image_size"])
        model.load_state_dict(load_file(weights_path))
        return model.eval()


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def classifier_path(which: str) -> Path:
    if which not in CLASSIFIER_ROLES:
        raise ValueError(f"which must be one of {CLASSIFIER_ROLES} (got {which!r})")
    return ASSETS_DIR / f"digit-classifier-{which}.safetensors"


def load_digit_classifier(which: str = "reward", device=None, dtype=None) -> DigitClassifier:
    """The bundled classifier trained on the "reward" half (what DTS steers toward) or the "judge" half (evaluation)."""
    return DigitClassifier.from_file(classifier_path(which)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _judge(device: torch.device, dtype: torch.dtype) -> DigitClassifier:
    return load_digit_classifier("judge", device=device, dtype=dtype).requires_grad_(False)


@torch.no_grad()
def judge_features(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Judge features [B, feature_dim] (float32, on the images' device) of images [B, 1 or 3, H, W] in [0, 1]."""
    judge = _judge(images.device, images.dtype)
    parts = [judge.features(chunk) for chunk in images.split(batch_size)]
    return torch.cat(parts).float() if parts else images.new_zeros(0, judge.config["feature_dim"]).float()


def bundled_model_path() -> Path:
    """The folder of the bundled tiny Stable Diffusion pipeline, for `from_pretrained`."""
    if not (BUNDLED_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled digits pipeline is missing from {BUNDLED_MODEL_DIR}; reinstall dts-diffusers or regenerate "
            f"it with `python {TRAINING_SCRIPT}`"
        )
    return BUNDLED_MODEL_DIR
