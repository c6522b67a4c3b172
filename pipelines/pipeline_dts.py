"""Stable Diffusion 1.x / 2.x with Diffusion Tree Sampling in place of the denoising loop."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from dts_diffusers.options import TreeOptions

from .output import DTSPipelineOutput
from .tree_search import TreeSearchMixin


class DTSPipeline(TreeSearchMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` that steers generation toward a reward with Diffusion Tree Sampling / Search.

    Loading, devices, offloading and component swapping are the parent's. A call grows one tree per prompt with
    `nfe_budget` guided denoising steps and draws `num_images_per_prompt` images from it: in `mode="sample"` (DTS)
    they follow p(x)·exp(lam·reward(x)); in `mode="search"` (DTS*) they are the best found. A scheduler without a
    stochastic step (the PNDM that SD checkpoints ship with) is replaced for the call by DDIM with `eta` (the paper's
    setting, eta=1), with a warning.
    """

    _clip_skip_reads_text_model = True

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        vae_batch_size: int = 4,
        tree: list | None = None,
        **kwargs,
    ) -> DTSPipelineOutput | tuple:
        r"""Generate images steered toward `reward`.

        Besides StableDiffusionPipeline's arguments (all but the prompt are keyword-only, so a positional `height`
        written for the parent pipeline fails loudly instead of being taken for the reward):
            reward: a registered reward name, a reward object, or a callable `(images, prompts) -> Tensor[B]` taking
                float32 images in [0, 1] of shape [B, 3, H, W].
            num_inference_steps / guidance_scale: left out, the model folder's `dts_defaults.json` (the bundled
                digits model: 20 / 1.0), else Stable Diffusion's 50 / 7.5.
            reward_prompt: the text the reward scores the images against (default: `prompt`); needed with
                `prompt_embeds=` when the reward is prompt-conditioned (`reward.needs_prompts`: image-reward, clip,
                pickscore, hpsv2), which would otherwise score against nothing. A string, or one per prompt.
            nfe_budget: guided denoising steps per prompt (default: `rollout_batch_size` full rollouts).
            tree_options / keywords: how the tree is grown, a `dts_diffusers.TreeOptions`, and any of its fields as
                keywords, which replace those of `tree_options`: `lam` (λ ≥ 0 of the target p·exp(λ·r), default 1),
                `mode` ("sample": DTS, or "search": DTS*), `method` ("dts", "dts*", the paper's "dts-paper" /
                "dts*-paper", or a baseline of `dts_diffusers.methods.METHODS` under the same budget),
                `method_options`, `branch_every` / `branch_levels` (default: the paper's five levels, every
                num_inference_steps / 5 steps), `widening`, `c_uct`, `rollout_batch_size` (default 16; the UNet batch
                is twice this with CFG), `latent_cache_bytes` / `latent_cache_device`. `TreeOptions` documents each.
            vae_batch_size: latents decoded (and scored) together for the reward.
            tree: `output.trees` of an earlier call with the same prompts; the call keeps growing those trees. Each tree
                records what it was built for (`tree.built_for`: prompt, mode, method, guidance_scale, size, scheduler,
                num_inference_steps, eta, lam, rollout_batch_size); a call that differs in any raises before any
                model runs. A tree cut short by an interrupt first spends what the interrupt left of its budget.
            callback_on_step_end: `fn(pipe, step, nfe, {"latents": best x_0 latents so far})` after every engine
                batch; it returns None or the dict it was given (a tree cannot apply returned tensors, so new ones
                raise). Setting `pipe._interrupt = True` in it stops the search: every prompt keeps its tree (those
                not started yet stay empty and `tree=` continues them), images come from the trees that hold
                samples, and `output.interrupted` flags the prompts cut short. diffusers' `PipelineCallback` classes
                edit the per-step loop, which the tree does not have, and are refused.
            eta: DDIM's η (default 1.0, stochastic); eta=0 raises, since children would be identical.
            generator: one generator, or one per prompt (a prompt's images all come from one tree, seeded once; a
                list of one per image raises).
        Returns `DTSPipelineOutput`; with `return_dict=False`, what the parent pipeline returns:
        `(images, nsfw_content_detected)`.
        """
        num_inference_steps, guidance_scale = self._fill_run_defaults(num_inference_steps, guidance_scale)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
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
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
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
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, 1, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )  # fmt: skip
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            timestep_cond = self.get_guidance_scale_embedding(
                torch.tensor([guidance_scale - 1]), embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=prompt_embeds.dtype)
        for i, run in enumerate(call.runs):
            run.conditioning.update(
                encoder_hidden_states=torch.stack([negative_prompt_embeds[i], prompt_embeds[i]])
                if self.do_classifier_free_guidance
                else prompt_embeds[i : i + 1],
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

            # 3. decode, check, postprocess as StableDiffusionPipeline does
            has_nsfw_concept = None
            if output_type == "latent":
                images = latents
            else:
                images = self._decode_latents(latents, vae_batch_size, call.timer)
                images, has_nsfw_concept = self.run_safety_checker(images, device, prompt_embeds.dtype)
                denormalize = [True] * len(images) if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
                images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw_concept
        return self._tree_output(call, images, rewards, trees, interrupted, nsfw_content_detected=has_nsfw_concept)
