"""What DTSPipeline and DTSXLPipeline share: the guided denoiser, the reward on decoded images, and the tree loop.

Each pipeline's `__call__` encodes its prompts its own way and hands one conditioning per prompt to `_grow_trees`,
which grows one tree per prompt with the engine and draws the images from it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import logging

from dts_diffusers.engine import check_lambda, default_branch_levels
from dts_diffusers.k_sampling import widening_option
from dts_diffusers.methods import METHODS, build_sampler, sampler_option_names
from dts_diffusers.rewards import Reward, as_reward, reward_names
from dts_diffusers.schedulers import STOCHASTIC_SCHEDULERS, SchedulerTransition, stochastic_kind

logger = logging.get_logger(__name__)

UNSUPPORTED_ARGUMENTS = {
    "latents": "DTS draws every x_T from the tree's own seeds; pass generator= for reproducible results",
    "timesteps": "custom schedules are not supported; set num_inference_steps (and the scheduler's timestep_spacing)",
    "sigmas": "custom schedules are not supported; set num_inference_steps (and the scheduler's timestep_spacing)",
    "ip_adapter_image": "IP-Adapter is not supported by the DTS pipelines",
    "ip_adapter_image_embeds": "IP-Adapter is not supported by the DTS pipelines",
    "denoising_end": "every rollout must reach x_0 to be scored, so denoising_end is not supported",
    "callback": "use callback_on_step_end",
    "callback_steps": "use callback_on_step_end",
}


def resolve_reward(reward, device: torch.device) -> Reward:
    """A registered name (loaded on `device`), a `{name: weight}` mapping, a reward object or a callable."""
    if reward is None:
        raise ValueError(
            f"reward is required: a registered name ({', '.join(reward_names())}), a reward object, or a callable "
            "(images, prompts) -> Tensor[B] taking float32 images in [0, 1]"
        )
    return as_reward(reward, device=device)


def tree_levels(num_inference_steps: int, branch_every: int | None, branch_levels) -> list[int]:
    """Branch levels: explicit, every `branch_every` steps from the top (50, 40, …, 10), or the paper's five."""
    if branch_levels is not None:
        return [int(level) for level in branch_levels]
    if branch_every is None:
        return default_branch_levels(num_inference_steps)
    if not isinstance(branch_every, int) or branch_every < 1:
        raise ValueError(f"branch_every must be a positive integer (got {branch_every!r})")
    return list(range(num_inference_steps, 0, -branch_every))


PIPELINE_SET_OPTIONS = {
    "lam": "lam=",
    "mode": "mode=",
    "branch_levels": "branch_levels= or branch_every=",
    "widening": "widening=",
    "c_uct": "c_uct=",
    "batch_size": "rollout_batch_size=",
    "latent_device": "latent_cache_device=",
    "latent_budget_bytes": "latent_cache_bytes=",
    "seed": "generator=",
    "device": "the pipeline's device",
    "renoise": "the scheduler (the pipeline passes its forward process)",
}


def distinct_samples(samplers: list) -> list[int] | None:
    """Distinct terminal states among each sampler's last draw (fewer than asked when a search tree ran short)."""
    counts = [getattr(sampler, "last_draw_distinct", None) for sampler in samplers]
    return None if not counts or any(count is None for count in counts) else counts


def check_method_options(method: str, method_options) -> dict:
    """The sampler options of `method` that the pipeline does not set itself, checked by name."""
    if method_options is None:
        return {}
    if not isinstance(method_options, dict):
        raise TypeError(f"method_options must be a dict of sampler options (got {type(method_options).__name__})")
    for name in method_options:
        if name in PIPELINE_SET_OPTIONS:
            raise ValueError(f"method_options[{name!r}] is set by the pipeline; use {PIPELINE_SET_OPTIONS[name]}")
    accepted = [name for name in sampler_option_names(method) if name not in PIPELINE_SET_OPTIONS]
    unknown = sorted(set(method_options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no option {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return dict(method_options)


def expand_rows(conditioning, n: int):
    """Repeat every tensor's rows n times ([uncond, cond] → [uncond × n, cond × n]), through nested dicts."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.repeat_interleave(n, dim=0)
    if isinstance(conditioning, dict):
        return {key: expand_rows(value, n) for key, value in conditioning.items()}
    return conditioning


def engine_seeds(generator, num_prompts: int, num_images_per_prompt: int) -> list[int]:
    """One engine seed per prompt, drawn from the caller's generator(s): the same generator gives the same trees."""
    if isinstance(generator, list):
        if len(generator) not in (num_prompts, num_prompts * num_images_per_prompt):
            raise ValueError(
                f"got {len(generator)} generators for {num_prompts} prompts; pass one generator, one per prompt, or "
                "one per image"
            )
        generators = generator[:: len(generator) // num_prompts]
    else:
        generators = [generator] * num_prompts
    return [
        int(torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu")) for g in generators
    ]


class PhaseTimer:
    """Wall time per phase; synchronises CUDA so asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


class TreeSearchMixin:
    """Shared machinery of the DTS pipelines; mixed in before the diffusers pipeline class."""

    _upcast_fp16_vae = False  # the SDXL VAE overflows in fp16 (its config says force_upcast)

    def _check_tree_inputs(
        self, height, width, lam, mode, method, nfe_budget, rollout_batch_size, tensor_inputs, callback, extra
    ) -> list[str]:
        for name in extra:
            if name in UNSUPPORTED_ARGUMENTS:
                raise ValueError(f"{name}= is not supported by {type(self).__name__}: {UNSUPPORTED_ARGUMENTS[name]}")
            raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {name!r}")
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be divisible by the VAE scale factor {factor} (got {height}x{width}); "
                f"e.g. {height // factor * factor}x{width // factor * factor}"
            )
        check_lambda(lam)
        if mode not in ("sample", "search"):
            raise ValueError(f"mode must be 'sample' (DTS, draws ∝ p·exp(λr)) or 'search' (DTS*, best) (got {mode!r})")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if nfe_budget is not None and (not isinstance(nfe_budget, int) or nfe_budget < 1):
            raise ValueError(f"nfe_budget must be a positive integer (got {nfe_budget!r})")
        if not isinstance(rollout_batch_size, int) or rollout_batch_size < 1:
            raise ValueError(f"rollout_batch_size must be a positive integer (got {rollout_batch_size!r})")
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            tensor_inputs = callback.tensor_inputs
        if set(tensor_inputs) - {"latents"}:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs={list(tensor_inputs)}: the DTS pipelines pass only 'latents' "
                "(the best x_0 latents found so far)"
            )
        return list(tensor_inputs)

    def _tree_scheduler(self):
        """The pipeline's scheduler if its step is stochastic; otherwise DDIM (the paper's choice) from its config."""
        if stochastic_kind(self.scheduler) is not None:
            return self.scheduler
        logger.warning(
            f"{type(self.scheduler).__name__} has no stochastic step, which DTS needs: this call uses DDIMScheduler "
            f"built from its config (eta= sets the noise). To choose, set pipe.scheduler to {STOCHASTIC_SCHEDULERS}."
        )
        config = dict(self.scheduler.config)
        return DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))

    def _denoiser(self, conditioning: dict, timer: PhaseTimer, counts: dict) -> Callable:
        """`denoise(model_input, t)`: one guided model output per row; 2 UNet rows per row with CFG."""
        guided = self.do_classifier_free_guidance

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([x, x]) if guided else x
            with timer("unet"):
                output = self.unet(
                    model_input,
                    t,
                    **expand_rows(conditioning, x.shape[0]),
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]
            counts["unet_evals"] += model_input.shape[0]
            if not guided:
                return output
            uncond, text = output.chunk(2)
            output = uncond + self.guidance_scale * (text - uncond)
            if self.guidance_rescale > 0:
                output = rescale_noise_cfg(output, text, guidance_rescale=self.guidance_rescale)
            return output

        return denoise

    @contextmanager
    def _vae_precision(self) -> Iterator[None]:
        """Decode in float32 for the whole call when the fp16 VAE is known to overflow (SDXL's force_upcast)."""
        upcast = self._upcast_fp16_vae and self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def _decode_latents(self, latents: torch.Tensor, batch_size: int, timer: PhaseTimer) -> torch.Tensor:
        """VAE decode in chunks of `batch_size` (memory); images in [-1, 1]."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with timer("vae_decode"):
            return torch.cat(
                [self.vae.decode(chunk.to(self.vae.dtype), return_dict=False)[0] for chunk in latents.split(batch_size)]
            )

    def _scorer(self, reward: Reward, prompt: str, vae_batch_size: int, timer: PhaseTimer, counts: dict) -> Callable:
        """The engine's `reward(x0_latents)`: decode, map to float32 [0, 1], score with the prompt."""

        def score(latents: torch.Tensor) -> torch.Tensor:
            images = (self._decode_latents(latents, vae_batch_size, timer) / 2 + 0.5).clamp(0, 1).float()
            with timer("reward"):
                rewards = reward(images, [prompt] * len(images))
            counts["reward_calls"] += len(images)
            return torch.as_tensor(rewards).float()

        return score

    def _search(
        self,
        *,
        prompts: list[str],
        conditionings: list[dict],
        reward: Reward,
        latent_shape: tuple[int, ...],
        dtype: torch.dtype,
        num_inference_steps: int,
        eta: float,
        nfe_budget: int | None,
        num_images_per_prompt: int,
        generator,
        tree: list | None,
        method_options: dict | None,
        method: str,
        lam: float,
        mode: str,
        branch_every: int | None,
        branch_levels,
        widening,
        c_uct: float,
        rollout_batch_size: int,
        latent_cache_bytes: int | None,
        latent_cache_device,
        vae_batch_size: int,
        callback_on_step_end,
        tensor_inputs: list[str],
        timer: PhaseTimer,
        counts: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Grow (or continue) one tree per prompt by `nfe_budget` NFE, then draw `num_images_per_prompt` from each.

        Returns the drawn x_0 latents, their rewards, and the trees. Stops early on `self._interrupt`; prompts whose
        tree was not started by then get no images.
        """
        device = self._execution_device
        scheduler = self._tree_scheduler()
        nfe_budget = nfe_budget or rollout_batch_size * num_inference_steps
        if tree is not None and not isinstance(tree, list | tuple):
            tree = [tree]
        if tree is not None and len(tree) != len(prompts):
            raise ValueError(
                f"tree= has {len(tree)} trees for {len(prompts)} prompts; pass output.trees of a call with the same "
                "prompts"
            )
        seeds = engine_seeds(generator, len(prompts), num_images_per_prompt) if tree is None else []
        extra_options = check_method_options(method, method_options)
        options = {
            "lam": lam,
            "mode": mode,
            "branch_levels": tree_levels(num_inference_steps, branch_every, branch_levels),
            **widening_option(widening),
            "c_uct": c_uct,
            "batch_size": rollout_batch_size,
            "latent_device": latent_cache_device,
            "latent_budget_bytes": latent_cache_bytes,
        }
        samplers, step = [], 0
        with self.progress_bar(total=nfe_budget * len(prompts)) as progress:
            for index, (prompt, conditioning) in enumerate(zip(prompts, conditionings, strict=True)):
                transition = SchedulerTransition(
                    scheduler, self._denoiser(conditioning, timer, counts), num_inference_steps, eta=eta
                )
                prior = transition.prior(latent_shape, device=device, dtype=dtype)
                score = self._scorer(reward, prompt, vae_batch_size, timer, counts)
                if tree is None:
                    sampler = build_sampler(
                        method, prior, transition, score, num_inference_steps, seed=seeds[index], device=device,
                        renoise=transition.renoise, **options, **extra_options,
                    )  # fmt: skip
                else:
                    sampler = tree[index]
                    if sampler.num_steps != num_inference_steps or sampler.lam != lam:
                        raise ValueError(
                            f"tree= was built with num_inference_steps={sampler.num_steps} and lam={sampler.lam}; "
                            "continue it with the same values"
                        )
                    sampler.prior, sampler.transition, sampler.reward = prior, transition, score
                    if hasattr(sampler, "renoise"):
                        sampler.renoise = transition.renoise
                start_nfe, before = sampler.nfe, sampler.timings.as_dict()
                seen = start_nfe

                def after_batch(sampler) -> bool:
                    nonlocal seen, step
                    progress.update(sampler.nfe - seen)
                    seen = sampler.nfe
                    if callback_on_step_end is not None:
                        tensors = {"latents": sampler.best()[0]} if tensor_inputs else {}
                        callback_on_step_end(self, step, sampler.nfe, tensors)
                    step += 1
                    return self.interrupt

                sampler.run(nfe_budget, callback=after_batch)
                after = sampler.timings.as_dict()
                timer.seconds["engine"] += after["bookkeeping"] - before["bookkeeping"]
                timer.seconds["denoise"] += after["transition"] - before["transition"]
                counts["nfe"] += sampler.nfe - start_nfe
                samplers.append(sampler)
                if self.interrupt:
                    break
        drawn = [sampler.sample(num_images_per_prompt, return_rewards=True) for sampler in samplers]
        latents = torch.cat([x0 for x0, _ in drawn])
        rewards = torch.cat([r for _, r in drawn]).float()
        return latents, rewards, samplers
