"""The reward contract, the registry and the wrappers (callables, weighted sums).

A reward maps a batch of images in [0, 1] and their prompts to one float32 score per image:
`reward(images: Tensor[B, 3, H, W], prompts: list[str]) -> Tensor[B]`. It runs without autograd unless it was built
with `differentiable=True` (gradient-based baselines), and it returns the scores on the device of the images, so a
reward model can live on another device than the diffusion model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any

import torch
from torch import nn


class Reward(nn.Module):
    """Base class: subclasses implement `score(images, prompts)` on images already on the reward's device and dtype."""

    name: str = "reward"
    needs_prompts: bool = True
    supports_gradients: bool = True
    image_channels: tuple[int, ...] = (3,)

    def __init__(self, differentiable: bool = False):
        super().__init__()
        self.differentiable = differentiable

    @property
    def differentiable(self) -> bool:
        return self._differentiable

    @differentiable.setter
    def differentiable(self, value: bool) -> None:
        if value and not self.supports_gradients:
            raise ValueError(f"the {self.name!r} reward has no gradient; use differentiable=False")
        self._differentiable = bool(value)

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        tensor = next(self.parameters(), None)
        return tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        prompt_list = _check_inputs(self, images, prompts)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            scores = self.score(images.to(device=self.device, dtype=self.dtype), prompt_list)
        return _check_scores(self.name, scores, images)


def _check_inputs(reward: Reward, images: torch.Tensor, prompts: str | Sequence[str] | None) -> list[str] | None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in reward.image_channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"the {reward.name!r} reward expects images as a Tensor[B, {'|'.join(map(str, reward.image_channels))}, "
            f"H, W] in [0, 1] (got {shape}); decode latents with the VAE and map [-1, 1] to [0, 1] first"
        )
    batch = images.shape[0]
    if prompts is None:
        if reward.needs_prompts:
            raise ValueError(f"the {reward.name!r} reward needs one prompt per image; pass prompts=[...]")
        return None
    if isinstance(prompts, str):
        return [prompts] * batch
    prompt_list = list(prompts)
    if len(prompt_list) == 1 and batch > 1:
        return prompt_list * batch
    if len(prompt_list) != batch:
        raise ValueError(f"got {len(prompt_list)} prompts for {batch} images; pass one prompt, or one per image")
    return prompt_list


def _check_scores(name: str, scores: Any, images: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"the {name!r} reward returned {type(scores).__name__}; it must return a Tensor[{batch}]")
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch,):
        raise ValueError(
            f"the {name!r} reward returned shape {tuple(scores.shape)} for {batch} images; it must return one score "
            f"per image, Tensor[{batch}]"
        )
    return scores.to(device=images.device, dtype=torch.float32)


class CallableReward(Reward):
    """Any `fn(images, prompts) -> Tensor[B]`; an `nn.Module` fn is registered so `.to()` moves it."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None, needs_prompts: bool = False):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"a reward must be callable as fn(images, prompts) (got {type(fn).__name__})")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.needs_prompts = needs_prompts

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        prompt_list = _check_inputs(self, images, prompts)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            scores = self.fn(images, prompt_list)
        return _check_scores(self.name, scores, images)


class WeightedSum(Reward):
    """`sum_k weight_k * reward_k(images, prompts)`, e.g. ImageReward plus a little aesthetic score."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        super().__init__()
        if not terms:
            raise ValueError("a weighted sum needs at least one (reward, weight) term")
        self.terms = nn.ModuleList(reward for reward, _ in terms)
        self.weights = [float(weight) for _, weight in terms]
        self.name = " + ".join(f"{weight:g}*{reward.name}" for reward, weight in terms)
        self.needs_prompts = any(reward.needs_prompts for reward in self.terms)
        self.supports_gradients = all(reward.supports_gradients for reward in self.terms)

    @Reward.differentiable.setter
    def differentiable(self, value: bool) -> None:
        Reward.differentiable.fset(self, value)
        for reward in getattr(self, "terms", ()):
            reward.differentiable = value

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        prompt_list = _check_inputs(self, images, prompts)
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        for reward, weight in zip(self.terms, self.weights, strict=True):
            total = total + weight * reward(images, prompt_list if reward.needs_prompts else None)
        return total


RewardLike = str | Reward | Callable[..., torch.Tensor] | Mapping[str, float]

_REGISTRY: dict[str, Callable[..., Reward]] = {}
_BUILTIN: dict[str, str] = {
    "image-reward": "dts_diffusers.rewards.image_reward:load_image_reward",
    "clip": "dts_diffusers.rewards.clip:load_clip_score",
    "pickscore": "dts_diffusers.rewards.clip:load_pickscore",
    "aesthetic": "dts_diffusers.rewards.clip:load_aesthetic",
    "hpsv2": "dts_diffusers.rewards.hpsv2:load_hpsv2",
    "jpeg-compressibility": "dts_diffusers.rewards.jpeg:load_jpeg_compressibility",
    "jpeg-incompressibility": "dts_diffusers.rewards.jpeg:load_jpeg_incompressibility",
    "classifier": "dts_diffusers.rewards.classifier:load_classifier_reward",
    "digit-classifier": "dts_diffusers.rewards.classifier:load_digit_reward",
}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Make `load_reward(name, device=..., dtype=..., **kwargs)` call `factory(device=..., dtype=..., **kwargs)`."""
    if not callable(factory):
        raise TypeError(f"the factory for {name!r} must be callable (got {type(factory).__name__})")
    _REGISTRY[name] = factory


def reward_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTRY})


def reward_loader(name: str) -> Callable[..., Reward]:
    """The loader behind a registered name, without calling it (front ends read its parameters)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module, attribute = _BUILTIN[name].split(":")
        return getattr(import_module(module), attribute)
    raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())} (or pass a callable)")


def load_reward(
    name: RewardLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    differentiable: bool = False,
    **kwargs,
) -> Reward:
    """Build a reward by name, or a weighted sum from `{"image-reward": 1.0, "aesthetic": 0.1}`; a `Reward` or a
    callable `(images, prompts) -> Tensor[B]` is wrapped as `as_reward` does, so any reward-like value works here.

    `kwargs` go to the reward's loader (e.g. `pretrained_model_name_or_path=` for a local copy of the weights);
    a weighted sum takes per-term kwargs as `{name: {...}}` under `reward_kwargs=`.
    """
    if not isinstance(name, (str, Mapping)):
        reward = as_reward(name, device=device, dtype=dtype, **kwargs)
        reward.differentiable = differentiable or reward.differentiable
        return reward
    if isinstance(name, Mapping):
        per_term = kwargs.pop("reward_kwargs", {})
        if kwargs:
            raise TypeError(f"a weighted sum takes per-reward options as reward_kwargs={{name: {{...}}}}; got {kwargs}")
        terms = [(load_reward(term, device, dtype, **per_term.get(term, {})), weight) for term, weight in name.items()]
        combined = WeightedSum(terms)
        combined.differentiable = differentiable
        return combined
    reward = reward_loader(name)(device=device, dtype=dtype, **kwargs)
    reward.differentiable = differentiable
    return reward


def as_reward(
    obj: RewardLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> Reward:
    """Accept a reward object, a registered name, a `{name: weight}` mapping or a callable `(images, prompts)`.

    `device`/`dtype` place rewards loaded by name; a `Reward` or callable is used where its owner put it, which is how
    a reward model stays on another device than the diffusion model.
    """
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, (str, Mapping)):
        return load_reward(obj, device=device, dtype=dtype, **kwargs)
    if callable(obj):
        return CallableReward(obj, **kwargs)
    raise TypeError(
        f"cannot use {type(obj).__name__} as a reward; pass a name ({', '.join(reward_names())}), a Reward, a "
        f"{{name: weight}} mapping or a callable fn(images, prompts) -> Tensor[B]"
    )
