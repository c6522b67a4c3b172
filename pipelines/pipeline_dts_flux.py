"""FLUX.1 with Diffusion Tree Sampling in place of the denoising loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from dts_diffusers.defaults import FLUX, FLUX_SCHNELL, RunDefaults
from dts_diffusers.options import TreeOptions, check_real
from dts_diffusers.schedulers import FlowTransition

from .output import DTSPipelineOutput
from .tree_search import FlowMatchingMixin

NEGATIVE_IP_ADAPTER = "IP-Adapter is not supported by the DTS pipelines"


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """FluxPipeline's schedule before its shift: σ from 1 down to 1/N, where the scheduler's own spacing would end
    near its σ_min."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


class FluxFlowTransition(FlowTransition):
    """`FlowTransition` between the sigmas FluxPipeline steps through: `flux_sigmas` shifted by `mu`."""

    def __init__(self, scheduler, denoise: Callable, num_steps: int, eta: float = 1.0, mu: float | None = None):
        super().__init__(scheduler, denoise, num_steps, eta=eta, mu=mu)  # checks the scheduler and eta
        scheduler.set_timesteps(num_steps, sigmas=flux_sigmas(num_steps), mu=mu)
        self.sigmas, self.timesteps = [float(sigma) for sigma in scheduler.sigmas], scheduler.timesteps


class DTSFluxPipeline(FlowMatchingMixin, FluxPipeline):
    """`FluxPipeline` that steers generation toward a reward with Diffusion Tree Sampling / Search.

    Loading, devices, offloading, LoRA and component swapping are the parent's. A call grows one tree per prompt with
    `nfe_budget` denoising steps and draws `num_images_per_prompt` images from it, as `DTSPipeline` does. The tree
    steps between FluxPipeline's shifted sigmas with the rectified-flow ancestral step of noise level `eta`
    (`FluxFlowTransition`); its latents are the VAE's [C, H/8, W/8], packed into 2x2 patches for each transformer
    call only.
    """

    _run_family = FLUX
    _unsupported_arguments: ClassVar[dict[str, str]] = {
        "negative_ip_adapter_image": NEGATIVE_IP_ADAPTER,
        "negative_ip_adapter_image_embeds": NEGATIVE_IP_ADAPTER,
    }
    _do_true_cfg = False  # set by each call
    _true_cfg_scale = 1.0

    @classmethod
    def family_defaults(cls, transformer_config: Mapping | None = None) -> RunDefaults:
        """FLUX.1-dev's 28 steps / guidance 3.5; a transformer without a guidance input (FLUX.1-schnell, distilled to
        few steps) 4 / 0."""
        if transformer_config is not None and not transformer_config.get("guidance_embeds", True):
            return FLUX_SCHNELL
        return FLUX

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
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 512,
        vae_batch_size: int = 4,
        tree: list | None = None,
        **kwargs,
    ) -> DTSPipelineOutput | tuple:
        r"""Generate images steered toward `reward`.

        The tree's arguments (reward, reward_prompt, nfe_budget, tree_options and its fields as keywords: lam, mode,
        method, method_options, branch_every / branch_levels, widening, c_uct, rollout_batch_size, latent_cache_bytes /
        latent_cache_device; vae_batch_size, tree, callback_on_step_end, generator) are `DTSPipeline.__call__`'s; all
        but the two prompts are keyword-only. The rest are FluxPipeline's, except:
            num_inference_steps / guidance_scale: left out, the model folder's `dts_defaults.json`, else FLUX.1-dev's
                28 / 3.5 (a transformer without guidance input, FLUX.1-schnell: 4 / 0). guidance_scale is the
                transformer's guidance input (guidance-distilled models such as FLUX.1-dev; FLUX.1-schnell has none
                and ignores it), so one NFE is one transformer row.
            true_cfg_scale with negative_prompt (or negative embeddings): true classifier-free guidance; one NFE is
                then one guided step of one sample, two transformer rows (counted in `output.unet_evals`).
            height / width: multiples of 16 (the VAE's 8 times FLUX's 2x2 patches); others raise.
            eta: the noise level of the rectified-flow ancestral step, in (0, 1] (default 1); eta=0 raises, since
                every child of a node would be identical.
            output_type="latent": the latents unpacked, [B, C, H/8, W/8] as the tree holds them, not FluxPipeline's
                packed [B, H·W/256, 4C]; `pipe._pack_latents(latents, *latents.shape)` packs them.
            latents, sigmas and IP-Adapter are not supported (they raise).
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
        check_real("true_cfg_scale", true_cfg_scale, "the true classifier-free guidance weight; 1 turns it off")
        batch = self._check_prompt_inputs(prompt, prompt_embeds, negative_prompt_embeds, None, joint_attention_kwargs)
        self.check_inputs(
            prompt, prompt_2, height, width, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        self._do_true_cfg = true_cfg_scale > 1 and has_negative  # the parent's rule
        self._true_cfg_scale = true_cfg_scale
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        factor = self.vae_scale_factor
        latent_shape = (self.transformer.config.in_channels // 4, height // factor, width // factor)
        call = self._begin_trees(
            options, tensor_inputs, reward=reward, prompt=prompt, reward_prompt=reward_prompt, batch=batch,
            latent_shape=latent_shape, num_inference_steps=num_inference_steps, eta=eta, generator=generator,
            num_images_per_prompt=num_images_per_prompt, tree=tree, vae_batch_size=vae_batch_size,
        )  # fmt: skip

        # 1. one conditioning per prompt: [negative, prompt] with true classifier-free guidance
        encode = {"device": device, "max_sequence_length": max_sequence_length,
                  "lora_scale": (joint_attention_kwargs or {}).get("scale")}  # fmt: skip
        prompt_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            **encode,
        )  # fmt: skip
        if self._do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                prompt=per_prompt(negative_prompt, batch), prompt_2=per_prompt(negative_prompt_2, batch),
                prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode,
            )  # fmt: skip
            check_negative_shapes(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                  negative_pooled_prompt_embeds)  # fmt: skip
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

        # 3. decode and postprocess as FluxPipeline does
        images = self._postprocess(call, latents, output_type, vae_batch_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return self._tree_output(call, images, rewards, trees, interrupted)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True classifier-free guidance (the parent's `do_true_cfg`): true_cfg_scale > 1 and a negative prompt."""
        return self._do_true_cfg

    @property
    def _cfg_scale(self) -> float:
        return self._true_cfg_scale

    def _tree_fields(self) -> dict:
        return {"true_cfg_scale": self._true_cfg_scale if self._do_true_cfg else 1.0}

    def _embedding_width(self) -> tuple[int, str]:
        return self.transformer.config.joint_attention_dim, "the transformer's joint_attention_dim"

    def _image_size_multiple(self) -> tuple[int, str]:
        """The latents are packed in 2x2 patches, so the image sides are multiples of twice the VAE's factor; the
        parent would crop to one with a warning, which would make the tree's images smaller than asked."""
        return 2 * self.vae_scale_factor, f"the VAE's factor {self.vae_scale_factor} times FLUX's 2x2 patches"

    def _transition(
        self, scheduler, denoise: Callable, num_inference_steps: int, eta: float, latent_shape: tuple[int, ...]
    ) -> FluxFlowTransition:
        """The flow step over FluxPipeline's schedule, its shift `mu` set from the packed sequence length (one token
        per 2x2 latent patch) when the scheduler shifts dynamically (FLUX.1-dev; FLUX.1-schnell shifts by config)."""
        mu = None
        if scheduler.config.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                (latent_shape[1] // 2) * (latent_shape[2] // 2),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15),
            )
        return FluxFlowTransition(scheduler, denoise, num_inference_steps, eta=eta, mu=mu)

    def _model_output(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The transformer's velocity for a batch of unpacked latents: packed in, unpacked out, with the image and
        text position ids and, for a guidance-distilled model, guidance_scale as the guidance input."""
        rows, channels, height, width = model_input.shape
        device, text = model_input.device, conditioning["encoder_hidden_states"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((rows,), self.guidance_scale, device=device, dtype=torch.float32)
        velocity = self.transformer(
            hidden_states=self._pack_latents(model_input, rows, channels, height, width),
            timestep=t.to(device).expand(rows).to(model_input.dtype) / 1000,
            guidance=guidance,
            **conditioning,
            txt_ids=text.new_zeros(text.shape[1], 3),
            img_ids=self._prepare_latent_image_ids(rows, height // 2, width // 2, device, model_input.dtype),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor
        return self._unpack_latents(velocity, height * factor, width * factor, factor)


def per_prompt(text: str | list[str] | None, batch: int) -> list[str] | None:
    """A single negative prompt serves every prompt, as in the other DTS pipelines."""
    return [text] * batch if isinstance(text, str) else text


def check_negative_shapes(embeds, negative, pooled, negative_pooled) -> None:
    """Each prompt's [negative, prompt] rows run in one transformer batch, so their shapes must agree."""
    if negative.shape != embeds.shape or negative_pooled.shape != pooled.shape:
        raise ValueError(
            f"the negative embeddings must have the prompt embeddings' shapes (prompt_embeds {tuple(embeds.shape)}, "
            f"negative {tuple(negative.shape)}; pooled {tuple(pooled.shape)}, negative {tuple(negative_pooled.shape)})"
            ": encode the negative prompts with the same max_sequence_length, one per prompt"
        )
