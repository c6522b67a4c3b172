"""DTS / DTS* (and every baseline of `dts_diffusers.methods.METHODS`) as a k-diffusion sampler:
`sample_dts(model, x, sigmas, ...)` where `model(x, sigma) -> denoised`.

This is the contract of k-diffusion and of ComfyUI's `KSAMPLER` (the "SAMPLER" type), so any model ComfyUI can sample
works: the tree's transitions are ancestral steps in sigma space (``x = x0 + σ·ε`` models, η = 1 by default), or their
rectified-flow form (``x = (1 - σ)·x0 + σ·ε``, ComfyUI's ``CONST`` model sampling: SD3, FLUX, …).

Levels: with ``num_steps = len(sigmas) - 1``, level ``L`` holds states at ``sigmas[num_steps - L]`` and its transition
steps them to ``sigmas[num_steps - L + 1]``; level ``num_steps`` is x_T, level 0 the final sample. ``renoise`` goes
the other way, up the chain, with the forward process (DFS backtracks with it; samplers get it as ``renoise=``).

The prior. The sampler receives ``x`` already noised for ``sigmas[0]`` (ComfyUI: ``noise_scaling(sigmas[0], noise,
latent_image)``), but every root child of the tree needs its own x_T. So the prior re-noises the *clean* latent with
fresh per-row noise, using the same scaling: ``x_T = latent_image + σ_0·ε`` (``(1 - σ_0)·latent_image + σ_0·ε`` for
flow models; ComfyUI's own ``noise_scaling`` when the model exposes its ``model_sampling``). The clean latent is
``latent_image=`` when given, else ``model.latent_image`` (set by ComfyUI's ``KSAMPLER`` on the model it hands to the
sampler), else zeros (text-to-image, k-diffusion's convention ``x = ε·σ_0``). With denoise < 1 (img2img) ``σ_0`` is
below ``σ_max`` and the tree starts from the partly noised input image.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .methods import TREE_PRESETS, build_sampler, searches
from .noise import check_renoise_levels, randn_rows
from .options import TreeOptions

Denoiser = Callable[..., torch.Tensor]


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's split of one step into a deterministic step to `sigma_down` and fresh noise of std `sigma_up`."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def ancestral_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """Euler ancestral step for `x = x0 + σ·ε` (k-diffusion `sample_euler_ancestral`)."""
    if sigma_to == 0:
        return denoised
    sigma_down, sigma_up = get_ancestral_step(sigma_from, sigma_to, eta)
    d = (x - denoised) / sigma_from
    return x + d * (sigma_down - sigma_from) + noise * sigma_up


def ancestral_step_flow(
    x: torch.Tensor, denoised: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """Ancestral step for rectified flow `x = (1 - σ)·x0 + σ·ε` (ComfyUI `sample_euler_ancestral_RF`)."""
    if sigma_to == 0:
        return denoised
    sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
    alpha_to, alpha_down = 1 - sigma_to, 1 - sigma_down
    renoise = max(sigma_to**2 - sigma_down**2 * alpha_to**2 / alpha_down**2, 0.0) ** 0.5
    ratio = sigma_down / sigma_from
    x = ratio * x + (1 - ratio) * denoised
    return (alpha_to / alpha_down) * x + noise * renoise


def forward_noise(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """q(x_to | x_from) for `x = x0 + σ·ε` (σ_to ≥ σ_from): the variances add."""
    return x + max(sigma_to**2 - sigma_from**2, 0.0) ** 0.5 * noise


def forward_noise_flow(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """q(x_to | x_from) for rectified flow `x = (1 - σ)·x0 + σ·ε`: shrink the signal, then top the noise up to σ_to."""
    scale = (1 - sigma_to) / (1 - sigma_from)
    return scale * x + max(sigma_to**2 - scale**2 * sigma_from**2, 0.0) ** 0.5 * noise


def find_model_sampling(model) -> object | None:
    """ComfyUI's `model_sampling`, found by attribute (no import): KSamplerX0Inpaint → CFGGuider → BaseModel."""
    for path in (("inner_model", "inner_model"), ("inner_model",), ()):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        sampling = getattr(obj, "model_sampling", None)
        if sampling is not None:
            return sampling
    return None


def is_flow_sampling(model_sampling) -> bool:
    """True for ComfyUI's rectified-flow `CONST` model sampling (and its subclasses)."""
    return any(cls.__name__ == "CONST" for cls in type(model_sampling).__mro__)


def single_latent(latent_image: torch.Tensor) -> torch.Tensor:
    """The one latent a batch repeats: a batch of B equal latents asks for B samples of one target, a batch of
    different latents would be several targets (one tree each), which DTS does not do."""
    if latent_image.shape[0] > 1 and not torch.equal(latent_image, latent_image[:1].expand_as(latent_image)):
        raise ValueError(
            f"DTS steers one latent at a time (got a batch of {latent_image.shape[0]} different latents); "
            "use a batch of one latent (or of copies of it): the batch size sets the number of outputs"
        )
    return latent_image[:1]


def _clean_latent(latent_image: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """One clean latent row for the tree's root."""
    if latent_image is None:
        return torch.zeros_like(x[:1])
    latent_image = latent_image.to(device=x.device, dtype=x.dtype)
    if latent_image.shape[1:] != x.shape[1:]:
        raise ValueError(f"latent_image has shape {tuple(latent_image.shape)}, x has {tuple(x.shape)}")
    return single_latent(latent_image)


class SigmaChain:
    """The engine's prior and transition over a sigma schedule, for a denoiser `model(x, sigma) -> x0`."""

    def __init__(
        self,
        model: Denoiser,
        sigmas: torch.Tensor,
        latent: torch.Tensor,
        extra_args: dict,
        flow: bool,
        eta: float,
        noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        self.model, self.sigmas, self.latent, self.extra_args = model, sigmas, latent, extra_args
        self.num_steps = len(sigmas) - 1
        self.step = ancestral_step_flow if flow else ancestral_step
        self.forward = forward_noise_flow if flow else forward_noise
        self.eta, self.noise_scaling = eta, noise_scaling
        self.on_step: Callable[[torch.Tensor], object] | None = None  # sees each step's x̂_0 (progress, previews)

    def prior(self, n: int, generators: list[torch.Generator]) -> torch.Tensor:
        noise = randn_rows(generators, self.latent.shape[1:], device=self.latent.device, dtype=self.latent.dtype)
        return self.noise_scaling(self.sigmas[0], noise, self.latent.expand_as(noise).clone())

    def transition(self, x: torch.Tensor, level: int, generators: list[torch.Generator], return_x0: bool = False):
        index = self.num_steps - level
        sigma_from, sigma_to = float(self.sigmas[index]), float(self.sigmas[index + 1])
        denoised = self.model(x, self.sigmas[index] * x.new_ones([x.shape[0]]), **self.extra_args)
        if self.on_step is not None:
            self.on_step(denoised)
        noise = randn_rows(generators, x.shape[1:], device=x.device, dtype=x.dtype) if sigma_to > 0 else None
        x_prev = self.step(x, denoised, sigma_from, sigma_to, noise, self.eta)
        return (x_prev, denoised) if return_x0 else x_prev

    def renoise(
        self, x: torch.Tensor, from_level: int, to_level: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Draw x at `to_level` from the forward process q(x_to | x_from): how DFS backtracks up the chain."""
        check_renoise_levels(from_level, to_level, self.num_steps)
        sigma_from = float(self.sigmas[self.num_steps - from_level])
        sigma_to = float(self.sigmas[self.num_steps - to_level])
        noise = randn_rows(generators, x.shape[1:], device=x.device, dtype=x.dtype)
        return self.forward(x, sigma_from, sigma_to, noise)


class Scorer:
    """`reward(decode(latents))` as a float vector, `batch_size` latents at a time (a particle method hands over its
    whole population, which must not sit decoded at once); its callables are rebound each run, so a kept tree holds
    none."""

    def __init__(self, reward: Callable | None, decode: Callable | None, batch_size: int):
        self.reward, self.decode, self.batch_size = reward, decode, batch_size

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._score(chunk) for chunk in latents.split(self.batch_size)])

    def _score(self, latents: torch.Tensor) -> torch.Tensor:
        scores = self.reward(self.decode(latents) if self.decode is not None else latents)
        return torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()


@dataclass
class SearchTree:
    """A grown sampler (the tree, or a baseline's populations) that `sample_dts(tree=...)` continues with more budget.

    Between runs it holds no model, conditioning, VAE or reward (`detach`), only the search's own state and the
    `settings` a continuation must match, so keeping it (ComfyUI's `DTS_TREE` output) keeps no model alive.
    """

    sampler: object
    chain: SigmaChain
    scorer: Scorer
    settings: dict

    def detach(self) -> None:
        self.chain.model, self.chain.extra_args, self.chain.on_step = None, {}, None
        self.scorer.reward = self.scorer.decode = None

    def mismatch(self, settings: dict, latent: torch.Tensor) -> list[str]:
        """What differs from a run asking to continue this tree with `settings` from the clean `latent`."""
        wrong = [f"{key}={settings[key]} (the tree has {value})" for key, value in self.settings.items()
                 if settings[key] != value]  # fmt: skip
        if not wrong and not torch.equal(latent.to(self.chain.latent), self.chain.latent):
            wrong.append("a different latent image (img2img input)")
        return wrong


def tree_settings(sigmas: torch.Tensor, x: torch.Tensor, **options) -> dict:
    """What a tree is grown for; a continuation must match every item."""
    return {
        "steps": len(sigmas) - 1,
        "sigmas": [round(float(s), 6) for s in sigmas],
        "latent shape": list(x.shape[1:]),
        **options,
    }


def _default_noise_scaling(model_sampling, flow: bool) -> Callable:
    if model_sampling is not None and hasattr(model_sampling, "noise_scaling"):

        def comfy_scaling(sigma, noise, latent):
            sigma_max = float(model_sampling.sigma_max)
            max_denoise = math.isclose(float(sigma), sigma_max, rel_tol=1e-5) or float(sigma) > sigma_max
            return model_sampling.noise_scaling(sigma, noise, latent, max_denoise)

        return comfy_scaling
    if flow:
        return lambda sigma, noise, latent: sigma * noise + (1 - sigma) * latent
    return lambda sigma, noise, latent: latent + sigma * noise


def method_label(method: str, mode: str) -> str:
    """How a run is named in progress bars and summaries: "dts*" for the tree in search mode, "dts*-paper" for the
    paper's preset in search mode, "smc search", …"""
    if method in TREE_PRESETS:
        preset = method.removeprefix("dts").removeprefix("*")  # "" or "-paper"
        return f"dts{'*' if searches(method, mode) else ''}{preset}"
    return f"{method} search" if mode == "search" else method


@torch.no_grad()
def sample_dts(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], object] | None = None,
    disable: bool | None = None,
    *,
    reward: Callable[[torch.Tensor], torch.Tensor],
    nfe_budget: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tree_options: TreeOptions | None = None,
    num_outputs: int | None = None,
    seed: int | None = None,
    eta: float = 1.0,
    flow: bool | None = None,
    latent_image: torch.Tensor | None = None,
    noise_scaling: Callable | None = None,
    interrupt: Callable[[], object] | None = None,
    info: dict | None = None,
    tree: SearchTree | None = None,
    **option_fields,
) -> torch.Tensor:
    """Run `method` (any of `dts_diffusers.methods.METHODS`) over `sigmas` and return `num_outputs` samples.

    `reward(images) -> Tensor[n]` scores `decode(latents)` (images [n, 3, H, W] in [0, 1]), or the latents themselves
    when `decode` is None. How the tree (or baseline) grows is `tree_options` (a `TreeOptions`: λ, mode, method,
    branching, widening, rollout batch, …), whose fields may also be given as keywords (`lam=`, `mode=`, …), which
    replace those of `tree_options`. `method="dts"` grows the tree; the baselines run under the same NFE budget.
    `mode="sample"` draws the outputs from π* ∝ p·exp(λ·r); `"search"` returns the best found (with `"dts"` that is
    DTS*, which `method="dts*"` always is); `"dts-paper"` / `"dts*-paper"` are the paper's Algorithm 1 / DTS*.
    `callback` gets k-diffusion's dict after every denoising step batch (one model call) and every batch of
    rollouts, with the best sample found so far as `x`/`denoised` (before the first batch is scored: the step's x̂_0),
    `i` counting steps in proportion to the budget spent, and `nfe` (counted so far), `nfe_budget`, `best_reward`
    (None before the first batch) and `method`; `interrupt()` is called between batches and may raise to stop.
    `info`, when given, is filled with the drawn samples' `rewards`, the `best_reward`, the engine's `stats`, the
    NFE `nfe_budget` reached and the `tree` (a `SearchTree`). `tree=` continues such a tree with `nfe_budget` more NFE
    (anytime sampling); the run must match what it was grown for (steps, sigmas, latent, λ, mode, method, ...), and
    `seed` is then unused (the tree's own random streams go on). The given tree is not changed: a copy grows.
    Returns a tensor shaped like `x` with `num_outputs` rows (default: as many as `x`).
    """
    changes, unknown = TreeOptions.split_keywords(option_fields)
    if unknown:
        raise TypeError(f"sample_dts() got an unexpected keyword argument {next(iter(unknown))!r}")
    options = TreeOptions.build(tree_options, **changes)
    method, mode = options.method, options.mode
    extra_args = {} if extra_args is None else extra_args
    num_steps = len(sigmas) - 1
    if num_steps < 1:
        raise ValueError(f"sigmas must hold at least two values (got {len(sigmas)})")
    if not eta > 0:
        raise ValueError(
            f"eta must be > 0 (got {eta}): DTS branches on each step's fresh noise, and with eta=0 the steps are "
            "deterministic, so every child of a node would be the same; use eta=1 (ancestral sampling)"
        )
    label = method_label(method, mode)
    num_outputs = x.shape[0] if num_outputs is None else int(num_outputs)
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer (got {num_outputs})")
    model_sampling = find_model_sampling(model)
    if flow is None:
        flow = model_sampling is not None and is_flow_sampling(model_sampling)
    if latent_image is None:
        latent_image = getattr(model, "latent_image", None)
    latent = _clean_latent(latent_image, x)
    widening = options.widening
    settings = tree_settings(
        sigmas, x, lam=options.lam, mode=mode, method=method, eta=eta, flow=flow,
        **{"branch levels": options.levels(num_steps)},
        widening=widening if isinstance(widening, str) else repr(widening),
    )  # fmt: skip
    if tree is not None:
        wrong = tree.mismatch(settings, latent)
        if wrong:
            raise ValueError(
                f"this run cannot continue the given tree: {'; '.join(wrong)}. Continue a tree with the settings it "
                "was grown with, or start a new tree (disconnect the tree input)"
            )
        kept = copy.deepcopy(tree)
        kept.chain.model, kept.chain.extra_args = model, extra_args
        kept.scorer.reward, kept.scorer.decode = reward, decode
    else:
        chain = SigmaChain(
            model, sigmas, latent, extra_args, flow, eta, noise_scaling or _default_noise_scaling(model_sampling, flow)
        )
        scorer = Scorer(reward, decode, options.rollout_batch_size)
        sampler = build_sampler(
            method,
            chain.prior,
            chain.transition,
            scorer,
            num_steps,
            seed=int(extra_args.get("seed", 0) if seed is None else seed),
            device=x.device,
            renoise=chain.renoise,
            **options.sampler_options(num_steps),
        )
        kept = SearchTree(sampler, chain, scorer, settings)
    sampler = kept.sampler
    start = sampler.nfe
    target = start + nfe_budget
    progress = tqdm(total=nfe_budget, disable=disable, desc=label.upper())
    best: list = [None, None]  # the best sample found and its reward, as of the last batch

    def report(preview: torch.Tensor) -> None:
        """The NFE the engine has counted so far, and `preview` as the callback's x / denoised."""
        progress.update(sampler.nfe - start - progress.n)
        if callback is not None:
            step = min(num_steps - 1, (sampler.nfe - start) * num_steps // max(nfe_budget, 1))
            callback(
                {
                    "x": preview,
                    "i": step,
                    "sigma": sigmas[step],
                    "sigma_hat": sigmas[step],
                    "denoised": preview,
                    "nfe": sampler.nfe,
                    "nfe_budget": target,
                    "best_reward": best[1],
                    "method": label,
                }
            )

    def on_step(denoised: torch.Tensor) -> None:
        # the engine counts a step batch's NFE when it returns: `nfe` here is that of the steps before this one
        report(best[0] if best[0] is not None else denoised[:1])

    def on_batch(search) -> bool:
        if interrupt is not None and interrupt():
            return True
        if callback is not None:
            best[:] = search.best()
        report(best[0])
        return False

    kept.chain.on_step = on_step
    try:
        sampler.run(nfe_budget, callback=on_batch)
        kept.chain.on_step = None  # the draw's latent replays are not progress
        samples, rewards = sampler.sample(num_outputs, return_rewards=True)
    finally:
        progress.close()
        kept.detach()
    if info is not None:
        info.update(
            rewards=rewards,
            best_reward=sampler.best()[1],
            stats=sampler.stats(),
            method=label,
            nfe_budget=target,
            tree=kept,
        )
    return samples.to(device=x.device, dtype=x.dtype)
