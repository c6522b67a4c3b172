"""Rewards as ComfyUI-managed models, the way ComfyUI holds CLIP vision: a `ModelPatcher` around the reward's module.

ComfyUI's model management then counts the reward's weights, loads them to the GPU for scoring (freeing room first,
which may offload the UNet) and offloads them when another model needs the room, under the same `--lowvram`,
`--novram`, `--cpu` and `--highvram` rules as its own models. A reward's plain torch modules have none of ComfyUI's
weight casting, so the reward is loaded whole or not at all: `--novram` leaves it on the offload device (the CPU),
where it then runs.

The sampler's side: the UNet and the models ComfyUI's sampling loaded with it are loaded back after each scoring
batch (ComfyUI loads them once per sampling run; its ControlNet does the same after encoding a hint mid-run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dts_diffusers.rewards import Reward


class DTSRewardModel(torch.nn.Module):
    """The module a reward's `ModelPatcher` holds: the reward, plus the `device` attribute model management writes
    (a `Reward`'s own `device` is read-only: the device of its weights)."""

    def __init__(self, reward: Reward, device: torch.device):
        super().__init__()
        self.reward = reward
        self.device = device


class ComfyReward:
    """DTS_REWARD: a reward whose weights ComfyUI's model management places; calling it loads them, then scores."""

    def __init__(self, reward: Reward, load_device: torch.device, offload_device: torch.device):
        import comfy.model_patcher

        self.reward = reward
        self.patcher = comfy.model_patcher.ModelPatcher(
            DTSRewardModel(reward, offload_device), load_device=load_device, offload_device=offload_device
        )

    @property
    def name(self) -> str:
        return self.reward.name

    def __call__(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.reward(images, prompts)


def reward_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load, offload) devices of a reward: ComfyUI's torch device for 'auto', offloaded where ComfyUI offloads the
    UNet (the CPU; the GPU itself with --highvram / --gpu-only); the CPU for both with 'cpu'."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    import comfy.model_management

    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()


def sampling_models(model) -> list:
    """The models ComfyUI's sampling loaded for this run, from the KSamplerX0Inpaint a SAMPLER function gets: the
    guider's ModelPatcher (the UNet) and the extra models (ControlNets, ...) loaded with it."""
    guider = model.inner_model
    return [guider.model_patcher, *getattr(guider, "loaded_models", [])]  # a guider of another pack may have none


def reload_for_sampling(models: list) -> None:
    """Load the sampling run's models back after scoring, which may have offloaded them."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(models)
