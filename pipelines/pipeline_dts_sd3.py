"""Stable Diffusion 3 with Diffusion Tree Sampling in place of the denoising loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from dts_diffusers.defaults import STABLE_DIFFUSION_3
from dts_diffusers.options import TreeOptions
from dts_diffusers.schedulers import FlowTransition

from .output import DTSPipelineOutput
from .tree_search import FlowMatchingMixin

SKIP_LAYER_GUIDANCE = "skip-layer guidance adds transformer passes outside the NFE accounting and is not supported"


class DTSSD3Pipeline(FlowMatchingMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` that steers generation toward a reward with Diffusion Tree Sampling / Search.

    Loading, devices, offloading and component swapping are the parent's. A call grows one tree per prompt with
    `nfe_budget` guided denoising steps and draws `num_images_per_prompt` images from it, as `DTSPipeline` does.
    SD3's FlowMatchEulerDiscreteScheduler integrates an ODE, whose steps cannot branch, so the tree steps between
    its sigmas with the rectified-flow ancestral step of noise level `eta` (`FlowTransition`).
    """

    _run_family = STABLE_DIFFUSION_3

    _unsupported_arguments: ClassVar[dict[str, str]] = {
        "skip_guidance_layers": SKIP_LAYER_GUIDANCE,
        "skip_layer_guidance_scale": SKIP_LAYER_GUIDANCE,
        "skip_layer_guidance_start": SKIP_LAYER_GUIDANCE,
        "skip_layer_guidance_stop": SKIP_LAYER_GUIDANCE,
        "mu": "the schedule's shift comes from the scheduler config and the image size, as in the parent pipeline",
    }

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        *,
        reward=None,
        reward_prompt: str | list[str] | None = None,
        nfe_budget: int | None = None,
        tree_options: TreeOptions | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 256,
        vae_batch_size: int = 4,
        tree: list | None = None,
        **kwargs,
    ) -> DTSPipelineOutput | tuple:
        r"""Generate images steered toward `reward`.

        The tree's arguments (reward, reward_prompt, nfe_budget, tree_options and its fields as keywords: lam, mode,
        method, method_options, branch_every / branch_levels, widening, c_uct, rollout_batch_size, latent_cache_bytes /
        latent_cache_device; vae_batch_size, tree, callback_on_step_end, generator) are `DTSPipeline.__call__`'s; all
        but the three prompts are keyword-only. The rest are StableDiffusion3Pipeline's, except:
            num_inference_steps / guidance_scale: left out, the model folder's `dts_defaults.json`, else SD3's 28 / 7.0.
                One NFE is one guided step of one sample (two transformer rows with classifier-free guidance,
                counted in `output.unet_evals`).
            eta: the noise level of the rectified-flow ancestral step, in (0, 1] (default 1, the full ancestral
                step); eta=0 raises, since every child of a node would be identical.
            latents, sigmas, mu, skip-layer guidance and IP-Adapter are not supported (they raise).
        Returns `DTSPipelineOutput`; with `return_dict=False`, what the parent pipeline returns: `(images,)`.
        """
        num_inference_steps, guidance_scale = self._fill_run_defaults(num_inference_steps, guidance_scale)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        options, tensor_inputs = self._check_tree_inputs(
            tree_options=tree_options, kwargs=kwargs, height=height, width=width, nfe_budget=nfe_budget,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt, eta=eta,
            guidance_scale=guidance_scale, guidance_rescale=0.0, vae_batch_size=vae_batch_size,
            output_type=output_type, tensor_inputs=callback_on_step_end_tensor_inputs, callback=callback_on_step_end,
            tree=tree,
        )  # fmt: skip
        batch = self._check_prompt_inputs(
            prompt, prompt_embeds, negative_prompt_embeds, clip_skip, joint_attention_kwargs
        )
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        factor = self.vae_scale_factor
        latent_shape = (self.transformer.config.in_channels, height // factor, width // factor)
        call = self._begin_trees(
            options, tensor_inputs, reward=reward, prompt=prompt, reward_prompt=reward_prompt, batch=batch,
            latent_shape=latent_shape, num_inference_steps=num_inference_steps, eta=eta, generator=generator,
            num_images_per_prompt=num_images_per_prompt, tree=tree, vae_batch_size=vae_batch_size,
        )  # fmt: skip

        # 1. one conditioning per prompt: [uncond, cond] with classifier-free guidance
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=self.clip_skip,
            num_images_per_prompt=1, max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"),
        )  # fmt: skip
        self._set_joint_conditioning(
            call, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
        )

        # 2. grow one tree per prompt and draw the images from it
        latents, rewards, trees, interrupted = self._grow_trees(
            call,
            nfe_budget=nfe_budget,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
            callback_on_step_end=callback_on_step_end,
        )

        # 3. decode and postprocess as StableDiffusion3Pipeline does
        images = self._postprocess(call, latents, output_type, vae_batch_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return self._tree_output(call, images, rewards, trees, interrupted)

    def _embedding_width(self) -> tuple[int, str]:
        return self.transformer.config.joint_attention_dim, "the transformer's joint_attention_dim"

    def _transition(
        self, scheduler, denoise: Callable, num_inference_steps: int, eta: float, latent_shape: tuple[int, ...]
    ) -> FlowTransition:
        """The flow step over the schedule the parent would use, its shift `mu` set from the image size when the
        scheduler shifts dynamically."""
        mu = None
        if scheduler.config.get("use_dynamic_shifting", False):
            patch = self.transformer.config.patch_size
            mu = calculate_shift(
                (latent_shape[1] // patch) * (latent_shape[2] // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        return FlowTransition(scheduler, denoise, num_inference_steps, eta=eta, mu=mu)

    def _model_output(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The transformer's velocity for a batch of rows (the mixin's denoiser guides it as it guides the UNet)."""
        return self.transformer(
            hidden_states=model_input,
            timestep=t.to(model_input.device).expand(model_input.shape[0]),
            **conditioning,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
