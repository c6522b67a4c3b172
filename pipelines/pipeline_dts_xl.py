"""Stable Diffusion XL with Diffusion Tree Sampling in place of the denoising loop."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from dts_diffusers.defaults import STABLE_DIFFUSION_XL
from dts_diffusers.options import TreeOptions

from .output import DTSPipelineOutput
from .tree_search import TreeSearchMixin


class DTSXLPipeline(TreeSearchMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` that steers generation toward a reward with Diffusion Tree Sampling / Search.

    Loading, devices, offloading and component swapping are the parent's. A call grows one tree per prompt with
    `nfe_budget` guided denoising steps and draws `num_images_per_prompt` images from it: in `mode="sample"` (DTS)
    they follow p(x)·exp(lam·reward(x)); in `mode="search"` (DTS*) they are the best found. A scheduler without a
    stochastic step (the EulerDiscrete that SDXL checkpoints ship with) is replaced for the call by DDIM with `eta`
    (the paper's setting, eta=1), with a warning. The fp16 SDXL VAE decodes in float32, as the parent pipeline does.
    """

    _run_family = STABLE_DIFFUSION_XL

    _upcast_fp16_vae = True

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
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
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        vae_batch_size: int = 4,
        tree: list | None = None,
        **kwargs,
    ) -> DTSPipelineOutput | tuple:
        r"""Generate images steered toward `reward`.

        The tree's arguments (reward, reward_prompt, nfe_budget, tree_options and its fields as keywords: lam, mode,
        method, method_options, branch_every / branch_levels, widening, c_uct, rollout_batch_size, latent_cache_bytes /
        latent_cache_device; vae_batch_size, tree, callback_on_step_end, eta, generator) are `DTSPipeline.__call__`'s;
        all but the two prompts are keyword-only. The rest are StableDiffusionXLPipeline's, except:
            num_inference_steps / guidance_scale: left out, the folder's `dts_defaults.json`, else SDXL's 50 / 5.0.
            latents, timesteps, sigmas, denoising_end and IP-Adapter are not supported (they raise).
        Returns `DTSPipelineOutput`; with `return_dict=False`, what the parent pipeline returns: `(images,)`.
        """
        num_inference_steps, guidance_scale = self._fill_run_defaults(num_inference_steps, guidance_scale)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        options, tensor_inputs = self._check_tree_inputs(
            tree_options=tree_options, kwargs=kwargs, height=height, width=width, nfe_budget=nfe_budget,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt, eta=eta,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, vae_batch_size=vae_batch_size,
            output_type=output_type, tensor_inputs=callback_on_step_end_tensor_inputs, callback=callback_on_step_end,
            tree=tree,
        )  # fmt: skip
        batch = self._check_prompt_inputs(
            prompt, prompt_embeds, negative_prompt_embeds, clip_skip, cross_attention_kwargs
        )
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
        self._interrupt = False
        device = self._execution_device
        latent_shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        call = self._begin_trees(
            options, tensor_inputs, reward=reward, prompt=prompt, reward_prompt=reward_prompt, batch=batch,
            latent_shape=latent_shape, num_inference_steps=num_inference_steps, eta=eta, generator=generator,
            num_images_per_prompt=num_images_per_prompt, tree=tree, vae_batch_size=vae_batch_size,
        )  # fmt: skip

        # 1. one conditioning per prompt: [uncond, cond] with classifier-free guidance
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )  # fmt: skip
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device)  # fmt: skip
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim,
            ).to(device)  # fmt: skip
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            timestep_cond = self.get_guidance_scale_embedding(
                torch.tensor([guidance_scale - 1]), embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=prompt_embeds.dtype)
        for i, run in enumerate(call.runs):
            if self.do_classifier_free_guidance:
                hidden = torch.stack([negative_prompt_embeds[i], prompt_embeds[i]])
                text_embeds = torch.stack([negative_pooled_prompt_embeds[i], pooled_prompt_embeds[i]])
                time_ids = torch.cat([negative_add_time_ids, add_time_ids])
            else:
                hidden, text_embeds, time_ids = prompt_embeds[i : i + 1], pooled_prompt_embeds[i : i + 1], add_time_ids
            run.conditioning.update(
                encoder_hidden_states=hidden.to(device),
                added_cond_kwargs={"text_embeds": text_embeds.to(device), "time_ids": time_ids},
                timestep_cond=timestep_cond,
            )

        # 2. grow one tree per prompt and draw the images from it
        with self._vae_precision():
            latents, rewards, trees, interrupted = self._grow_trees(
                call,
                nfe_budget=nfe_budget,
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_images_per_prompt,
                callback_on_step_end=callback_on_step_end,
            )

            # 3. decode, watermark, postprocess as StableDiffusionXLPipeline does
            if output_type == "latent":
                images = latents
            else:
                images = self._decode_latents(latents, vae_batch_size, call.timer)
                if self.watermark is not None:
                    images = self.watermark.apply_watermark(images)
                images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return self._tree_output(call, images, rewards, trees, interrupted)
