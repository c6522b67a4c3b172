"""Rewards for steering diffusion: `reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]` (float32).

`load_reward(name, device=None, dtype=None, **kwargs)` builds one by name (see `reward_names()`), or a weighted sum
from `{"image-reward": 1.0, "aesthetic": 0.1}`; `as_reward` also accepts a `Reward` or any callable
`(images, prompts) -> Tensor[B]`. Model-backed rewards import their modules on first use.
"""

from .base import (
    CallableReward,
    Reward,
    WeightedSum,
    as_reward,
    load_reward,
    register_reward,
    reward_loader,
    reward_names,
)

__all__ = [
    "CallableReward",
    "Reward",
    "WeightedSum",
    "as_reward",
    "load_reward",
    "register_reward",
    "reward_loader",
    "reward_names",
]
