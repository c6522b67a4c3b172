from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class DTSPipelineOutput(BaseOutput):
    """What a DTS pipeline call returns.

    Args:
        images: `num_images_per_prompt` images per prompt drawn from its tree, as PIL images, a numpy array, a tensor
            or latents, per `output_type`.
        rewards: float32 tensor, the reward of each returned image (as scored during the search).
        nfe: guided denoising steps spent by this call (one NFE is one guided step of one sample).
        unet_evals: UNet evaluations by this call (2 per NFE with classifier-free guidance, 1 without; replays of
            evicted latents included).
        reward_calls: images scored by the reward in this call.
        timings: wall time in seconds per phase: `engine` (tree bookkeeping), `denoise` (every transition: UNet,
            scheduler arithmetic, noise), `unet`, `vae_decode`, `reward`, and `total`.
        trees: one sampler per prompt; pass `tree=output.trees` to a later call to keep growing them.
        nsfw_content_detected: the safety checker's flags, when the pipeline has one.
        distinct_samples: per prompt, how many of its images are distinct terminal states; in search mode fewer than
            `num_images_per_prompt` when the tree had fewer leaves (the best are then repeated, with a warning).
            None for methods that do not count them.
        interrupted: per prompt, whether `pipe._interrupt` cut its search short in this call. A prompt whose tree
            holds no sample yet (the interrupt came before it started) has no images; `images` and `rewards` hold
            those of the leading prompts whose trees do, and `tree=output.trees` continues every tree.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    rewards: torch.Tensor
    nfe: int
    unet_evals: int
    reward_calls: int
    timings: dict[str, float]
    trees: list = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    distinct_samples: list[int] | None = None
    interrupted: list[bool] = field(default_factory=list)
