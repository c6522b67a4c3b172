"""What the DTS pipelines share: the guided denoiser, the reward on decoded images, and the tree loop.

Each pipeline's `__call__` encodes its prompts its own way and hands one conditioning per prompt to `_grow_trees`,
which grows one tree per prompt with the engine and draws the images from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from diffusers import DDIMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import logging

from dts_diffusers.defaults import STABLE_DIFFUSION, RunDefaults, model_defaults
from dts_diffusers.engine import check_integer
from dts_diffusers.methods import build_sampler
from dts_diffusers.options import TreeOptions, check_real
from dts_diffusers.particles import NOT_DIFFERENTIABLE
from dts_diffusers.rewards import Reward, as_reward, reward_names
from dts_diffusers.schedulers import (
    FLOW_SCHEDULERS,
    STOCHASTIC_SCHEDULERS,
    FlowTransition,
    SchedulerTransition,
    is_flow_scheduler,
    stochastic_kind,
)

from .output import DTSPipelineOutput
from .timing import PhaseTimer

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


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def distinct_samples(samplers: list) -> list[int] | None:
    """Distinct terminal states among each sampler's last draw (fewer than asked when a search tree ran short; 0 for
    a tree an interrupt left empty)."""
    counts = [getattr(sampler, "last_draw_distinct", None) if sampler.nfe else 0 for sampler in samplers]
    return None if not counts or any(count is None for count in counts) else counts


def expand_rows(conditioning, n: int):
    """Repeat every tensor's rows n times ([uncond, cond] → [uncond × n, cond × n]), through nested dicts."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.repeat_interleave(n, dim=0)
    if isinstance(conditioning, dict):
        return {key: expand_rows(value, n) for key, value in conditioning.items()}
    return conditioning


def engine_seeds(generator, num_prompts: int) -> list[int]:
    """One engine seed per prompt, drawn from the caller's generator(s): the same generator gives the same trees."""
    generators = generator if isinstance(generator, list) else [generator] * num_prompts
    return [
        int(torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu")) for g in generators
    ]


def check_generator(generator, num_prompts: int, num_images_per_prompt: int) -> None:
    """One generator, or one per prompt: a prompt's images all come from one tree, seeded once."""
    generators = generator if isinstance(generator, list) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        kinds = sorted({type(g).__name__ for g in generators})
        raise TypeError(f"generator must be a torch.Generator or a list of them (got {', '.join(kinds)})")
    if isinstance(generator, list) and len(generator) != num_prompts:
        per_image = len(generator) == num_prompts * num_images_per_prompt and num_images_per_prompt > 1
        raise ValueError(
            f"got {len(generator)} generators for {num_prompts} prompts"
            + (f" x {num_images_per_prompt} images" if per_image else "")
            + ": the DTS pipelines draw all images of a prompt from one tree, seeded once, so they take one "
            f"generator, or a list of one per prompt ({num_prompts}), not one per image"
        )


def reward_prompts(reward: Reward, prompt, reward_prompt, batch: int) -> list[str | None]:
    """The text each prompt's images are scored against: `reward_prompt=`, else `prompt=`.

    With `prompt_embeds=` there is no text, and a prompt-conditioned reward (`needs_prompts`) scored against "" would
    steer toward nothing, so it needs `reward_prompt=`.
    """
    text = reward_prompt if reward_prompt is not None else prompt
    if text is None:
        if reward.needs_prompts:
            raise ValueError(
                f"the {reward.name!r} reward scores images against their prompt, but this call has prompt_embeds= "
                "and no prompt text: pass reward_prompt= with the text the embeddings encode (a string, or a list "
                "of one per prompt)"
            )
        return [None] * batch
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"reward_prompt must be a string or a list of strings (got {type(text).__name__})")
    if len(texts) != batch:
        raise ValueError(f"reward_prompt has {len(texts)} prompts for {batch} prompt embeddings; pass one per prompt")
    return list(texts)


def check_callback_return(returned, given: dict) -> None:
    """diffusers applies tensors a callback returns (e.g. new latents); a tree cannot, so only the given ones may be."""
    if returned is None:
        return
    if not isinstance(returned, dict):
        raise TypeError(
            f"callback_on_step_end returned {type(returned).__name__}; return None or the callback_kwargs dict "
            "it was given"
        )
    changed = sorted(key for key, value in returned.items() if key not in given or value is not given[key])
    if changed:
        raise ValueError(
            f"callback_on_step_end returned new {', '.join(map(repr, changed))}: the DTS pipelines cannot apply "
            "returned tensors (every latent of the tree is fixed by its seeds; 'latents' is the best x_0 so far, "
            "for reading). Return None or the callback_kwargs unchanged; to stop, set pipe._interrupt = True"
        )


TREE_FIELDS = (
    "pipeline", "prompt", "mode", "method", "guidance_scale", "height", "width", "latent_shape", "scheduler",
    "num_inference_steps", "eta", "lam", "rollout_batch_size",
)  # fmt: skip


def check_tree_matches(index: int, sampler, built_for: dict) -> None:
    """`tree=` continues a tree only with the arguments that built it; any change would mix two targets in one tree."""
    recorded = getattr(sampler, "built_for", None)
    if not isinstance(recorded, dict):
        raise ValueError(
            f"tree[{index}] ({type(sampler).__name__}) was not built by a DTS pipeline call, so what it was built "
            "for is unknown; pass output.trees of an earlier call"
        )
    names = [*TREE_FIELDS, *(name for name in built_for if name not in TREE_FIELDS)]  # then a pipeline's own
    changed = [name for name in names if recorded.get(name) != built_for[name]]
    if changed:
        differences = "; ".join(f"{name}={recorded.get(name)!r} then, {built_for[name]!r} now" for name in changed)
        raise ValueError(
            f"tree[{index}] was built with other arguments: {differences}. Continue a tree with the arguments that "
            "built it, or start a new one (tree=None)"
        )


@dataclass
class TreeRun:
    """One prompt's sampler and its conditioning, which is filled in once the prompt is encoded."""

    sampler: object
    conditioning: dict = field(default_factory=dict)


@dataclass
class TreeCall:
    """One pipeline call: its checked tree options, one run per prompt, and what it spends (time per phase, counts)."""

    options: TreeOptions
    tensor_inputs: list[str]
    timer: PhaseTimer
    runs: list[TreeRun] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"nfe": 0, "unet_evals": 0, "reward_calls": 0})
    start: float = field(default_factory=time.perf_counter)


class TreeSearchMixin:
    """Shared machinery of the DTS pipelines; mixed in before the diffusers pipeline class."""

    _upcast_fp16_vae = False  # the SDXL VAE overflows in fp16 (its config says force_upcast)
    _clip_skip_reads_text_model = False  # StableDiffusionPipeline.encode_prompt applies text_model.final_layer_norm
    _unsupported_arguments: ClassVar[dict[str, str]] = {}  # parent arguments a tree cannot honour, beyond the shared
    _attention_kwargs_name = "cross_attention_kwargs"
    _run_family: ClassVar[RunDefaults] = STABLE_DIFFUSION
    _eta_fix = "DDIM's noise scale; eta > 0 (the paper uses eta=1), eta=0 makes children identical"

    @classmethod
    def family_defaults(cls, transformer_config: Mapping | None = None) -> RunDefaults:
        """The family's run defaults (`_run_family`); a family whose models differ by their transformer's config
        (FLUX.1-dev / -schnell) picks by `transformer_config`, the `dts` command by the folder's file."""
        return cls._run_family

    def _fill_run_defaults(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple:
        """Steps and guidance left out (None): the model folder's `dts_defaults.json`, else the pipeline family's
        (`family_defaults`), the same file and table the `dts` command reads."""
        transformer = getattr(self, "transformer", None)
        family = self.family_defaults(None if transformer is None else transformer.config)
        defaults = model_defaults(getattr(self.config, "_name_or_path", None), family)
        steps = defaults.steps if num_inference_steps is None else num_inference_steps
        return steps, defaults.guidance_scale if guidance_scale is None else guidance_scale

    def _check_tree_inputs(
        self,
        *,
        tree_options: TreeOptions | None,
        kwargs: dict,
        height,
        width,
        nfe_budget,
        num_inference_steps,
        num_images_per_prompt,
        eta,
        guidance_scale,
        guidance_rescale,
        vae_batch_size,
        output_type,
        tensor_inputs,
        callback,
        tree,
    ) -> tuple[TreeOptions, list[str]]:
        """Check every argument of the tree search before any model runs.

        The tree's options come as `tree_options=` and as keywords naming its fields (`lam=`, `mode=`, …), which
        replace those of `tree_options`; any other keyword is an unsupported parent argument or a typo. Returns the
        checked `TreeOptions` and the callback's tensor inputs."""
        changes, extra = TreeOptions.split_keywords(kwargs)
        unsupported = {**UNSUPPORTED_ARGUMENTS, **self._unsupported_arguments}
        for name in extra:
            if name in unsupported:
                raise ValueError(f"{name}= is not supported by {type(self).__name__}: {unsupported[name]}")
            raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {name!r}")
        options = TreeOptions.build(tree_options, **changes)
        multiple, why = self._image_size_multiple()
        height = check_integer("height", height, f"a multiple of {multiple}")
        width = check_integer("width", width, f"a multiple of {multiple}")
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be divisible by {multiple} ({why}; got {height}x{width}); "
                f"e.g. {max(height // multiple, 1) * multiple}x{max(width // multiple, 1) * multiple}"
            )
        steps = check_integer("num_inference_steps", num_inference_steps, "the denoising steps of one rollout, e.g. 50")
        check_integer("num_images_per_prompt", num_images_per_prompt, "the images drawn from each prompt's tree")
        if nfe_budget is not None:
            check_integer("nfe_budget", nfe_budget, "the guided denoising steps to spend per prompt")
            fresh = tree is None or not isinstance(tree, list | tuple) or any(getattr(t, "nfe", 1) == 0 for t in tree)
            if fresh and nfe_budget < steps:
                raise ValueError(
                    f"nfe_budget={nfe_budget} is below one rollout: a new tree's first sample costs "
                    f"num_inference_steps={steps} NFE; give at least that"
                )
        check_real("eta", eta, self._eta_fix, minimum=0, strict=True)
        check_real("guidance_scale", guidance_scale, "classifier-free guidance weight; 1 or less turns it off")
        check_real("guidance_rescale", guidance_rescale, "0 turns the rescale off, 0.7 is the usual value", minimum=0)
        check_integer("vae_batch_size", vae_batch_size, "latents decoded together, e.g. 4")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {output_type!r})")
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            raise ValueError(
                f"{type(callback).__name__}: diffusers' PipelineCallback classes change the denoising loop step by "
                "step (guidance, prompt_embeds), which the tree search does not have; pass a function "
                "fn(pipe, step, nfe, callback_kwargs) -> None or callback_kwargs instead"
            )
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable (got {type(callback).__name__})")
        if isinstance(tensor_inputs, str) or not all(isinstance(name, str) for name in tensor_inputs):
            raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names (got {tensor_inputs!r})")
        if set(tensor_inputs) - {"latents"}:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs={list(tensor_inputs)}: the DTS pipelines pass only 'latents' "
                "(the best x_0 latents found so far)"
            )
        return options, list(tensor_inputs)

    def _check_prompt_inputs(self, prompt, prompt_embeds, negative_prompt_embeds, clip_skip, attention_kwargs) -> int:
        """The number of prompts; embeddings must be [prompts, tokens, the UNet's cross-attention width]. Checked
        before diffusers' `check_inputs`, which reads `.shape` of whatever it is given."""
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise TypeError(
                f"{self._attention_kwargs_name} must be a dict or None (got {type(attention_kwargs).__name__})"
            )
        if clip_skip is not None:
            check_integer("clip_skip", clip_skip, "the text encoder layers to skip from the end; None skips none",
                          minimum=0)  # fmt: skip
            encoders = [e for e in (self.text_encoder, getattr(self, "text_encoder_2", None)) if e is not None]
            layers = min((encoder.config.num_hidden_layers for encoder in encoders), default=None)
            if layers is not None and clip_skip >= layers:
                raise ValueError(f"clip_skip must be below the text encoder's {layers} layers (got {clip_skip})")
            if self._clip_skip_reads_text_model and encoders and not hasattr(encoders[0], "text_model"):
                raise ValueError(
                    f"clip_skip= needs {type(encoders[0]).__name__}.text_model, which StableDiffusionPipeline's "
                    "encode_prompt reads and this transformers version does not have; encode with clip_skip yourself "
                    "and pass prompt_embeds=, or leave clip_skip=None"
                )
        width, what = self._embedding_width()
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor (got {type(embeds).__name__})")
            if embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[-1] != width:
                raise ValueError(
                    f"{name} must be shaped [prompts, tokens, {width}] ({what}) "
                    f"(got {tuple(embeds.shape)}); encode the prompts with pipe.encode_prompt"
                )
        if prompt_embeds is not None:
            return prompt_embeds.shape[0]
        if isinstance(prompt, str):
            return 1
        if not isinstance(prompt, list) or not prompt or not all(isinstance(text, str) for text in prompt):
            raise ValueError(
                f"pass prompt= as a string or a non-empty list of strings, or prompt_embeds= (got prompt={prompt!r})"
            )
        return len(prompt)

    @property
    def _cfg_scale(self) -> float:
        """The classifier-free guidance weight the denoiser applies; FLUX's is true_cfg_scale, its guidance_scale
        being an input of the transformer."""
        return self.guidance_scale

    def _tree_fields(self) -> dict:
        """What else a tree was built for, beyond `TREE_FIELDS`, that `tree=` must match (FLUX: true_cfg_scale)."""
        return {}

    def _image_size_multiple(self) -> tuple[int, str]:
        """What image sides must be a multiple of, and why (for the error message)."""
        return self.vae_scale_factor, f"the VAE scale factor {self.vae_scale_factor}"

    def _embedding_width(self) -> tuple[int, str]:
        """The width prompt embeddings must have, and what sets it (for the error message)."""
        return self.unet.config.cross_attention_dim, "the UNet's cross_attention_dim"

    def _transition(
        self, scheduler, denoise: Callable, num_inference_steps: int, eta: float, latent_shape: tuple[int, ...]
    ) -> SchedulerTransition | FlowTransition:
        """The tree's stochastic step over `scheduler`; a pipeline whose schedulers step otherwise overrides it."""
        return SchedulerTransition(scheduler, denoise, num_inference_steps, eta=eta)

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
        """`denoise(model_input, t)`: one guided model output per row; 2 backbone rows per row with CFG."""
        guided = self.do_classifier_free_guidance

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([x, x]) if guided else x
            with timer("unet"):
                output = self._model_output(model_input, t, expand_rows(conditioning, x.shape[0]))
            counts["unet_evals"] += model_input.shape[0]
            if not guided:
                return output
            uncond, text = output.chunk(2)
            output = uncond + self._cfg_scale * (text - uncond)
            rescale = getattr(self, "guidance_rescale", 0.0)  # SD / SDXL only; SD3 has no guidance_rescale
            if rescale > 0:
                output = rescale_noise_cfg(output, text, guidance_rescale=rescale)
            return output

        return denoise

    def _model_output(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The backbone's raw output for a batch of rows: the UNet's; a pipeline with another backbone overrides it."""
        return self.unet(
            model_input, t, **conditioning, cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False
        )[0]

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
            shift = getattr(config, "shift_factor", None) or 0.0  # SD3's VAE shifts; SD / SDXL VAEs have None
            latents = latents / config.scaling_factor + shift
        with timer("vae_decode"):
            return torch.cat(
                [self.vae.decode(chunk.to(self.vae.dtype), return_dict=False)[0] for chunk in latents.split(batch_size)]
            )

    def _scorer(
        self, reward: Reward, prompt: str | None, vae_batch_size: int, timer: PhaseTimer, counts: dict
    ) -> Callable:
        """The engine's `reward(x0_latents)`: decode, map to float32 [0, 1], score with the prompt, `vae_batch_size`
        latents at a time, so a particle method's whole population never sits decoded in memory at once.

        Without prompt text (`prompt_embeds=` alone) only prompt-free rewards get here, and they are given ""."""

        def score(latents: torch.Tensor) -> torch.Tensor:
            return torch.cat([score_chunk(chunk) for chunk in latents.split(vae_batch_size)])

        def score_chunk(latents: torch.Tensor) -> torch.Tensor:
            images = (self._decode_latents(latents, vae_batch_size, timer) / 2 + 0.5).clamp(0, 1).float()
            with timer("reward"):
                rewards = reward(images, [prompt or ""] * len(images))
            counts["reward_calls"] += len(images)
            return torch.as_tensor(rewards).float().cpu()

        return score

    def _begin_trees(
        self,
        options: TreeOptions,
        tensor_inputs: list[str],
        *,
        reward,
        prompt,
        reward_prompt,
        batch: int,
        **prepare,
    ) -> TreeCall:
        """Resolve the reward and build (or rebind) every prompt's tree, before any model runs."""
        call = TreeCall(options, tensor_inputs, PhaseTimer(self._execution_device))
        reward = resolve_reward(reward, self._execution_device)
        prompts = reward_prompts(reward, prompt, reward_prompt, batch)
        call.runs = self._prepare_trees(
            prompts=prompts, reward=reward, options=options, timer=call.timer, counts=call.counts, **prepare
        )
        return call

    def _tree_output(self, call: TreeCall, images, rewards, trees, interrupted, **extra) -> DTSPipelineOutput:
        """The call's output: images, rewards, what was spent, the trees (`extra`: the parent's other fields)."""
        return DTSPipelineOutput(
            images=images,
            rewards=rewards,
            nfe=call.counts["nfe"],
            unet_evals=call.counts["unet_evals"],
            reward_calls=call.counts["reward_calls"],
            timings={**call.timer.seconds, "total": time.perf_counter() - call.start},
            trees=trees,
            distinct_samples=distinct_samples(trees),
            interrupted=interrupted,
            **extra,
        )

    def _prepare_trees(
        self,
        *,
        prompts: list[str | None],
        reward: Reward,
        latent_shape: tuple[int, ...],
        num_inference_steps: int,
        eta: float,
        generator,
        num_images_per_prompt: int,
        tree: list | None,
        options: TreeOptions,
        vae_batch_size: int,
        timer: PhaseTimer,
        counts: dict,
    ) -> list[TreeRun]:
        """Build (or check and rebind) one sampler per prompt, before any model runs, so that every option of the
        tree and every mismatch with `tree=` fails first. Each denoiser reads its conditioning when it runs; the
        caller fills `TreeRun.conditioning` once the prompts are encoded."""
        device = self._execution_device
        scheduler = self._tree_scheduler()
        num_inference_steps = int(num_inference_steps)  # numpy ints too
        if tree is not None and not isinstance(tree, list | tuple):
            tree = [tree]
        if tree is not None and len(tree) != len(prompts):
            raise ValueError(
                f"tree= has {len(tree)} trees for {len(prompts)} prompts; pass output.trees of a call with the same "
                "prompts"
            )
        height, width = (size * self.vae_scale_factor for size in latent_shape[1:])
        built_for = {
            "pipeline": type(self).__name__, "mode": options.mode, "method": options.method,
            "guidance_scale": self.guidance_scale,
            "height": height, "width": width, "latent_shape": tuple(latent_shape),
            "scheduler": type(scheduler).__name__, "num_inference_steps": num_inference_steps, "eta": eta,
            "lam": options.lam, "rollout_batch_size": options.rollout_batch_size, **self._tree_fields(),
        }  # fmt: skip
        if tree is not None:
            for index, (sampler, prompt) in enumerate(zip(tree, prompts, strict=True)):
                check_tree_matches(index, sampler, {**built_for, "prompt": prompt})
        else:
            check_generator(generator, len(prompts), num_images_per_prompt)
            seeds = engine_seeds(generator, len(prompts))
            if options.method_options.get("local_search_steps") and not reward.differentiable:
                raise ValueError(NOT_DIFFERENTIABLE)  # the sampler would find out only at its first ascent
            sampler_options = options.sampler_options(num_inference_steps)
        runs = []
        for index, prompt in enumerate(prompts):
            run = TreeRun(sampler=None)
            transition = self._transition(
                scheduler, self._denoiser(run.conditioning, timer, counts), num_inference_steps, eta, latent_shape
            )
            prior = self._prior(transition, latent_shape, run.conditioning)
            score = self._scorer(reward, prompt, vae_batch_size, timer, counts)
            if tree is None:
                run.sampler = build_sampler(
                    options.method, prior, transition, score, num_inference_steps, seed=seeds[index], device=device,
                    renoise=transition.renoise, **sampler_options,
                )  # fmt: skip
                run.sampler.built_for = {**built_for, "prompt": prompt}
            else:
                run.sampler = tree[index]
                run.sampler.prior, run.sampler.transition, run.sampler.reward = prior, transition, score
                if hasattr(run.sampler, "renoise"):
                    run.sampler.renoise = transition.renoise
            runs.append(run)
        return runs

    def _prior(
        self, transition: SchedulerTransition | FlowTransition, shape: tuple[int, ...], conditioning: dict
    ) -> Callable:
        """x_T in the dtype of the prompt's embeddings, which are known only once the prompt is encoded."""
        device = self._execution_device

        def draw(n: int, generators: list[torch.Generator]) -> torch.Tensor:
            dtype = conditioning["encoder_hidden_states"].dtype
            return transition.prior(shape, device=device, dtype=dtype)(n, generators)

        return draw

    def _grow_trees(
        self,
        call: TreeCall,
        *,
        nfe_budget: int | None,
        num_inference_steps: int,
        num_images_per_prompt: int,
        callback_on_step_end,
    ) -> tuple[torch.Tensor, torch.Tensor, list, list[bool]]:
        """Grow each prompt's tree by `nfe_budget` NFE, then draw `num_images_per_prompt` from each.

        Returns the drawn x_0 latents, their rewards, the trees, and which prompts were cut short by
        `self._interrupt`. Every prompt keeps its tree; one that holds no sample yet (the interrupt came before it
        started) contributes no images, so the images are those of the leading prompts whose trees hold samples.
        """
        runs = call.runs
        nfe_budget = int(nfe_budget or call.options.rollout_batch_size * num_inference_steps)
        num_images_per_prompt = int(num_images_per_prompt)
        interrupted = [False] * len(runs)
        step = 0
        with self.progress_bar(total=nfe_budget * len(runs)) as progress:
            for index, run in enumerate(runs):
                if self.interrupt:
                    interrupted[index:] = [True] * (len(runs) - index)
                    break
                sampler = run.sampler
                start_nfe, before = sampler.nfe, sampler.timings.as_dict()
                seen = start_nfe

                def after_batch(sampler) -> bool:
                    nonlocal seen, step
                    progress.update(sampler.nfe - seen)
                    seen = sampler.nfe
                    if callback_on_step_end is not None:
                        tensors = {"latents": sampler.best()[0]} if call.tensor_inputs else {}
                        check_callback_return(callback_on_step_end(self, step, sampler.nfe, tensors), tensors)
                    step += 1
                    return self.interrupt

                sampler.run(nfe_budget, callback=after_batch)
                after = sampler.timings.as_dict()
                call.timer.add("engine", after["bookkeeping"] - before["bookkeeping"])
                call.timer.add("denoise", after["transition"] - before["transition"])
                call.counts["nfe"] += sampler.nfe - start_nfe
                if self.interrupt:
                    interrupted[index] = True
                else:  # a budget that is not a multiple of the rollout cost leaves a remainder: the bar ends at 100 %
                    progress.total += sampler.nfe - start_nfe - nfe_budget
                    progress.refresh()
        samplers = [run.sampler for run in runs]
        drawn = [sampler.sample(num_images_per_prompt, return_rewards=True) for sampler in samplers if sampler.nfe]
        latents = torch.cat([x0 for x0, _ in drawn])
        rewards = torch.cat([r for _, r in drawn]).float()
        return latents, rewards, samplers, interrupted


class FlowMatchingMixin(TreeSearchMixin):
    """What the flow-matching transformer pipelines (SD 3, FLUX) share: the tree steps between a flow scheduler's
    sigmas, one joint conditioning (token and pooled embeddings) per prompt, and a plain decode and postprocess."""

    _attention_kwargs_name = "joint_attention_kwargs"
    _eta_fix = "the flow step's noise level in (0, 1] (default 1); eta=0 is the ODE step, whose children are identical"

    def _tree_scheduler(self):
        """The pipeline's flow-matching scheduler; the tree takes only its sigmas, never its (deterministic) step."""
        if not is_flow_scheduler(self.scheduler):
            raise ValueError(
                f"{type(self).__name__} steps between the sigmas of a flow-matching scheduler "
                f"({', '.join(FLOW_SCHEDULERS)}), not {type(self.scheduler).__name__}; set "
                "`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`"
            )
        return self.scheduler

    def _set_joint_conditioning(self, call: TreeCall, embeds, pooled, negative_embeds, negative_pooled) -> None:
        """Each prompt's token and pooled embeddings, [negative, prompt] rows when guidance is classifier-free."""
        device = self._execution_device
        for i, run in enumerate(call.runs):
            if self.do_classifier_free_guidance:
                hidden = torch.stack([negative_embeds[i], embeds[i]])
                pooled_rows = torch.stack([negative_pooled[i], pooled[i]])
            else:
                hidden, pooled_rows = embeds[i : i + 1], pooled[i : i + 1]
            run.conditioning.update(encoder_hidden_states=hidden.to(device), pooled_projections=pooled_rows.to(device))

    def _postprocess(self, call: TreeCall, latents: torch.Tensor, output_type: str, vae_batch_size: int):
        """Decode and postprocess as the parent does (no safety checker), or the latents for output_type="latent"."""
        if output_type == "latent":
            return latents
        images = self._decode_latents(latents, vae_batch_size, call.timer)
        return self.image_processor.postprocess(images, output_type=output_type)
