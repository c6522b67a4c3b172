"""Stable Diffusion XL with Diffusion Tree Sampling in place of the denoising loop."""

from __future__ import annotations

import time
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from dts_diffusers.defaults import STABLE_DIFFUSION_XL
from dts_diffusers.tree import Widening

from .output import DTSPipelineOutput
from .tree_search import PhaseTimer, TreeSearchMixin, distinct_samples, resolve_reward, reward_prompts


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
        lam: float = 1.0,
        nfe_budget: int | None = None,
        mode: str = "sample",
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
        method: str = "dts",
        branch_every: int | None = None,
        branch_levels: list[int] | None = None,
        widening: Widening | str = "default",
        c_uct: float = 1.0,
        rollout_batch_size: int = 16,
        vae_batch_size: int = 4,
        latent_cache_bytes: int | None = None,
        latent_cache_device: str | torch.device | None = None,
        tree: list | None = None,
        method_options: dict | None = None,
        **kwargs,
    ) -> DTSPipelineOutput | tuple:
        r"""Generate images steered toward `reward`.

        Besides StableDiffusionXLPipeline's arguments (all but the two prompts are keyword-only, as in DTSPipeline):
            reward: a registered reward name, a reward object, or a callable `(images, prompts) -> Tensor[B]` taking
                float32 images in [0, 1] of shape [B, 3, H, W].
            reward_prompt: the text the reward scores the images against (default: `prompt`); needed with
                `prompt_embeds=` when the reward is prompt-conditioned (`reward.needs_prompts`: image-reward, clip,
                pickscore, hpsv2), which would otherwise score against nothing. A string, or one per prompt.
            lam: finite λ ≥ 0 of the target p·exp(λ·r); 0 samples the base model. The greedy limit λ = ∞ is not a
                value of lam: use mode="search" (DTS*), which returns the best images found.
            nfe_budget: guided denoising steps per prompt (default: `rollout_batch_size` full rollouts).
            mode: "sample" (DTS) or "search" (DTS*).
            method: "dts" (the tree), "dts-paper" / "dts*-paper" (the paper's Algorithm 1 / DTS*), or a baseline of
                `dts_diffusers.methods.METHODS` under the same budget ("dfs" is depth-first search with backtracking).
            branch_every / branch_levels: where the tree branches (default: the paper's five levels, every
                num_inference_steps / 5 steps: 50, 40, 30, 20, 10).
            widening: progressive widening per level, a `Widening` or 'default' / 'paper'; the paper's uniform
                c = 2, α = 0.8 is 'paper'. 'default' keeps the method's own ('paper' for the "-paper" methods).
            c_uct: exploration constant of search mode.
            rollout_batch_size: rollouts denoised together (the UNet batch is twice this with CFG).
            vae_batch_size: latents decoded together for the reward.
            latent_cache_bytes / latent_cache_device: bound and place the tree's stored latents; evicted ones are
                replayed from their seeds.
            tree: `output.trees` of an earlier call with the same prompts; the call keeps growing those trees. Each tree
                records what it was built for (`tree.built_for`: prompt, mode, method, guidance_scale, size, scheduler,
                num_inference_steps, eta, lam, rollout_batch_size); a call that differs in any raises before any
                model runs. A tree cut short by an interrupt first spends what the interrupt left of its budget.
            method_options: further options of the method's sampler, e.g. `{"max_backtracks": 2}` for "dfs" or
                `{"local_search_steps": 2, "local_search_step_size": 0.05}` for "bfs"/"dfs" (local search needs a
                reward built with `differentiable=True`); see `dts_diffusers.methods.sampler_option_names(method)`.
            callback_on_step_end: `fn(pipe, step, nfe, {"latents": best x_0 latents so far})` after every engine
                batch; it returns None or the dict it was given (a tree cannot apply returned tensors, so new ones
                raise). Setting `pipe._interrupt = True` in it stops the search: every prompt keeps its tree (those
                not started yet stay empty and `tree=` continues them), images come from the trees that hold
                samples, and `output.interrupted` flags the prompts cut short. diffusers' `PipelineCallback` classes
                edit the per-step loop, which the tree does not have, and are refused.
            eta: DDIM's η (default 1.0, stochastic); eta=0 raises, since children would be identical.
            generator: one generator, or one per prompt (a prompt's images all come from one tree, seeded once; a
                list of one per image raises).
        Returns `DTSPipelineOutput`; with `return_dict=False`, what the parent pipeline returns: `(images,)`.
        """
        num_inference_steps, guidance_scale = self._fill_run_defaults(num_inference_steps, guidance_scale)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        tensor_inputs = self._check_tree_inputs(
            height=height, width=width, lam=lam, mode=mode, method=method, nfe_budget=nfe_budget,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt, eta=eta,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, c_uct=c_uct,
            rollout_batch_size=rollout_batch_size, vae_batch_size=vae_batch_size,
            latent_cache_bytes=latent_cache_bytes, latent_cache_device=latent_cache_device, output_type=output_type,
            tensor_inputs=callback_on_step_end_tensor_inputs, callback=callback_on_step_end, tree=tree, extra=kwargs,
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
        reward = resolve_reward(reward, device)
        timer = PhaseTimer(device)
        counts = {"nfe": 0, "unet_evals": 0, "reward_calls": 0}
        call_start = time.perf_counter()
        latent_shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        runs = self._prepare_trees(
            prompts=reward_prompts(reward, prompt, reward_prompt, batch), reward=reward, latent_shape=latent_shape,
            num_inference_steps=num_inference_steps, eta=eta, generator=generator,
            num_images_per_prompt=num_images_per_prompt, tree=tree, method_options=method_options, method=method,
            lam=lam, mode=mode, branch_every=branch_every, branch_levels=branch_levels, widening=widening,
            c_uct=c_uct, rollout_batch_size=rollout_batch_size, latent_cache_bytes=latent_cache_bytes,
            latent_cache_device=latent_cache_device, vae_batch_size=vae_batch_size, timer=timer, counts=counts,
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
        for i, run in enumerate(runs):
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
                runs, nfe_budget=nfe_budget, num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_images_per_prompt, rollout_batch_size=rollout_batch_size,
                callback_on_step_end=callback_on_step_end, tensor_inputs=tensor_inputs, timer=timer, counts=counts,
            )  # fmt: skip

            # 3. decode, watermark, postprocess as StableDiffusionXLPipeline does
            if output_type == "latent":
                images = latents
            else:
                images = self._decode_latents(latents, vae_batch_size, timer)
                if self.watermark is not None:
                    images = self.watermark.apply_watermark(images)
                images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DTSPipelineOutput(
            images=images,
            rewards=rewards,
            nfe=counts["nfe"],
            unet_evals=counts["unet_evals"],
            reward_calls=counts["reward_calls"],
            timings={**timer.seconds, "total": time.perf_counter() - call_start},
            trees=trees,
            distinct_samples=distinct_samples(trees),
            interrupted=interrupted,
        )
