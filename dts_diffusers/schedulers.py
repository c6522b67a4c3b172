"""Stochastic diffusers schedulers as stateless tree transitions.

A diffusers scheduler walks its timesteps in order and keeps a step counter (multistep solvers also keep past model
outputs). The tree visits levels in any order and replays edges from stored seeds, so a transition must be a pure
function of (x, level, noise). `SchedulerTransition` computes every level's coefficients once, in closed form, from the
scheduler's own `alphas_cumprod` / `sigmas` after `set_timesteps`, and reproduces `scheduler.step` for:

- `DDIMScheduler` with η > 0 (the paper's setting is η = 1);
- `DDPMScheduler` (posterior mean and fixed variance);
- `EulerAncestralDiscreteScheduler` (sigma-space ancestral step);
- `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`, first order: a second-order step would need the
  model output of the parent's own parent, which a tree node revisited from another path does not have.

Every step is written in one form, with x̂₀ and ε̂ derived from the model output by its `prediction_type`:
``x_prev = x_coef·x + x0_coef·x̂₀ + eps_coef·ε̂ + noise_coef·z``, the model seeing ``in_scale·x``.

`FlowTransition` does the same for `FlowMatchEulerDiscreteScheduler` (SD3, FLUX), whose own step is deterministic:
it takes the rectified-flow ancestral step of `dts_diffusers.k_sampling` on the scheduler's sigmas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from .k_sampling import ancestral_step_flow, forward_noise_flow
from .noise import check_renoise_levels, randn_rows

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STOCHASTIC_SCHEDULERS = (
    "DDIMScheduler (eta > 0; the paper uses eta=1), DDPMScheduler, EulerAncestralDiscreteScheduler, "
    "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')"
)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def stochastic_kind(scheduler) -> str | None:
    """The kind of stochastic step this module reproduces for `scheduler`, or None if it has none."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return "ddim"
    if name == "DDPMScheduler":
        return "ddpm"
    if name == "EulerAncestralDiscreteScheduler":
        return "euler_ancestral"
    if name == "DPMSolverMultistepScheduler" and scheduler.config.algorithm_type == "sde-dpmsolver++":
        return "dpmpp_sde"
    return None


def unsupported_scheduler_error(scheduler, reason: str) -> ValueError:
    return ValueError(
        f"{type(scheduler).__name__} {reason}: DTS needs a stochastic denoising step so that the children of a node "
        f"differ. Use {STOCHASTIC_SCHEDULERS}, e.g. "
        "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`"
    )


@dataclass(frozen=True)
class StepCoefficients:
    """One level's step: the model sees `in_scale·x` at `timestep`, whose signal/noise scales are `alpha`/`sigma`."""

    timestep: torch.Tensor
    in_scale: float
    alpha: float
    sigma: float
    x_coef: float
    x0_coef: float
    eps_coef: float
    noise_coef: float


def ddim_coefficients(scheduler, index: int, eta: float) -> StepCoefficients:
    """DDIM (Song et al. 2021, eq. 12 and 16), with `DDIMScheduler.step`'s previous timestep and final alpha."""
    timestep = scheduler.timesteps[index]
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    return StepCoefficients(
        timestep, 1.0, alpha_t**0.5, (1 - alpha_t) ** 0.5, 0.0, alpha_prev**0.5, (1 - alpha_prev - std**2) ** 0.5, std
    )


def ddpm_coefficients(scheduler, index: int) -> StepCoefficients:
    """DDPM posterior q(x_prev | x_t, x̂₀) (Ho et al. 2020, eq. 6-7) between consecutive scheduled timesteps."""
    timestep = scheduler.timesteps[index]
    t = int(timestep)
    prev = int(scheduler.timesteps[index + 1]) if index + 1 < len(scheduler.timesteps) else -1
    alpha_t = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else 1.0
    beta_t = 1 - alpha_t / alpha_prev
    variance_type = scheduler.config.variance_type
    if variance_type in ("fixed_small", "fixed_small_log"):
        variance = max((1 - alpha_prev) / (1 - alpha_t) * beta_t, 1e-20)
    elif variance_type == "fixed_large":
        variance = beta_t
    else:
        raise ValueError(
            f"DDPMScheduler variance_type={variance_type!r} is not supported; use 'fixed_small' (the default) or "
            "'fixed_large'"
        )
    return StepCoefficients(
        timestep,
        1.0,
        alpha_t**0.5,
        (1 - alpha_t) ** 0.5,
        (1 - beta_t) ** 0.5 * (1 - alpha_prev) / (1 - alpha_t),
        alpha_prev**0.5 * beta_t / (1 - alpha_t),
        0.0,
        variance**0.5 if t > 0 else 0.0,
    )


def euler_ancestral_coefficients(scheduler, index: int) -> StepCoefficients:
    """k-diffusion's Euler ancestral step in sigma space: x = x₀ + σ·ε, the model sees x / sqrt(σ² + 1)."""
    sigma, sigma_to = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    scale = (sigma**2 + 1) ** -0.5
    return StepCoefficients(
        scheduler.timesteps[index],
        scale,
        scale,
        sigma * scale,
        sigma_down / sigma,
        1 - sigma_down / sigma,
        0.0,
        sigma_up,
    )


def dpmpp_sde_coefficients(scheduler, index: int) -> StepCoefficients:
    """First-order SDE-DPM-Solver++ (Lu et al. 2022) from σ to σ_to, in the variance-preserving space."""
    sigma, sigma_to = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    alpha, alpha_to = (sigma**2 + 1) ** -0.5, (sigma_to**2 + 1) ** -0.5
    decay = sigma_to / sigma  # exp(-h), h the step in log signal-to-noise ratio
    return StepCoefficients(
        scheduler.timesteps[index],
        1.0,
        alpha,
        sigma * alpha,
        alpha_to * decay**2 / alpha,
        alpha_to * (1 - decay**2),
        0.0,
        sigma_to * alpha_to * (1 - decay**2) ** 0.5,
    )


def predict_x0_eps(
    x_in: torch.Tensor, model_output: torch.Tensor, alpha: float, sigma: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂₀ and ε̂ from a model output, for a model input x_in = alpha·x₀ + sigma·ε."""
    if prediction_type == "epsilon":
        return (x_in - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x_in - alpha * model_output) / sigma
    return alpha * x_in - sigma * model_output, alpha * model_output + sigma * x_in


class SchedulerTransition:
    """`transition(x, level, generators, return_x0=False)` for the DTS engine, from a stochastic diffusers scheduler.

    Calls `scheduler.set_timesteps(num_steps)` once; level L takes one step from `scheduler.timesteps[num_steps - L]`.
    `denoise(model_input, timestep)` returns the (guided) model output; the transition has already scaled the input
    (what `scheduler.scale_model_input` does), so the denoiser must not scale it again.
    """

    def __init__(self, scheduler, denoise: Denoiser, num_steps: int, eta: float = 1.0):
        kind = stochastic_kind(scheduler)
        if kind is None:
            raise unsupported_scheduler_error(scheduler, "has no stochastic step that DTS supports")
        if kind == "ddim" and not eta > 0:
            raise ValueError(
                f"DDIMScheduler with eta={eta} is deterministic: every child of a node would be identical. "
                "Use eta > 0 (the paper uses eta=1), or DDPMScheduler / EulerAncestralDiscreteScheduler"
            )
        if kind != "ddim" and eta != 1.0:
            raise ValueError(f"eta applies to DDIMScheduler only (got eta={eta} with {type(scheduler).__name__})")
        config = scheduler.config
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={config.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if getattr(config, "thresholding", False):
            raise ValueError(f"{type(scheduler).__name__}(thresholding=True) is not supported; set thresholding=False")
        scheduler.set_timesteps(num_steps)
        if len(scheduler.timesteps) != num_steps:
            raise ValueError(
                f"{type(scheduler).__name__} made {len(scheduler.timesteps)} timesteps for num_steps={num_steps}; "
                "the tree needs exactly one timestep per level"
            )
        self.scheduler, self.denoise, self.num_steps, self.kind = scheduler, denoise, num_steps, kind
        self.prediction_type = config.prediction_type
        self.clip_range = config.clip_sample_range if getattr(config, "clip_sample", False) else None
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        coefficients = {
            "ddim": lambda i: ddim_coefficients(scheduler, i, eta),
            "ddpm": lambda i: ddpm_coefficients(scheduler, i),
            "euler_ancestral": lambda i: euler_ancestral_coefficients(scheduler, i),
            "dpmpp_sde": lambda i: dpmpp_sde_coefficients(scheduler, i),
        }[kind]
        # levels[L] for L in 1..num_steps; index 0 is unused so that a level indexes its own step
        self.levels = [None, *(coefficients(num_steps - level) for level in range(1, num_steps + 1))]

    def timestep(self, level: int) -> torch.Tensor:
        return self.levels[level].timestep

    def step(
        self, x: torch.Tensor, model_output: torch.Tensor, level: int, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_prev, x̂₀)` from a model output, in float32 arithmetic, returned in x's dtype; pure."""
        c = self.levels[level]
        sample, output = x.float(), model_output.float()
        x0, eps = predict_x0_eps(c.in_scale * sample, output, c.alpha, c.sigma, self.prediction_type)
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        x_prev = c.x_coef * sample + c.x0_coef * x0 + c.eps_coef * eps
        if c.noise_coef and noise is not None:
            x_prev = x_prev + c.noise_coef * noise.float()
        return x_prev.to(x.dtype), x0.to(x.dtype)

    def __call__(
        self, x: torch.Tensor, level: int, generators: Sequence[torch.Generator], return_x0: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= level <= self.num_steps:
            raise ValueError(f"level must lie in 1..{self.num_steps} (got {level})")
        c = self.levels[level]
        model_output = self.denoise((c.in_scale * x.float()).to(x.dtype), c.timestep)
        noise = randn_rows(generators, x.shape[1:], device=x.device) if c.noise_coef else None
        x_prev, x0 = self.step(x, model_output, level, noise)
        return (x_prev, x0) if return_x0 else x_prev

    def renoise(
        self, x: torch.Tensor, from_level: int, to_level: int, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Draw x at `to_level` from the forward process q(x_to | x_from), for from_level < to_level; pure.

        Uses the signal and noise scales of the timesteps the transition steps from at those levels (level 0 is x₀:
        scale 1, no noise). For the variance-preserving schedulers (DDIM, DDPM, SDE-DPM++) that is
        x_hi = sqrt(ᾱ_hi/ᾱ_lo)·x_lo + sqrt(1 − ᾱ_hi/ᾱ_lo)·ε with ᾱ from `alphas_cumprod`; in Euler ancestral's sigma
        space (x = x₀ + σ·ε) it is x_hi = x_lo + sqrt(σ_hi² − σ_lo²)·ε.
        """
        check_renoise_levels(from_level, to_level, self.num_steps)
        signal_from, noise_from = self.state_scales(from_level)
        signal_to, noise_to = self.state_scales(to_level)
        gain = signal_to / signal_from
        std = max(noise_to**2 - gain**2 * noise_from**2, 0.0) ** 0.5
        noise = randn_rows(generators, x.shape[1:], device=x.device)
        return (gain * x.float() + std * noise).to(x.dtype)

    def state_scales(self, level: int) -> tuple[float, float]:
        """`(signal, noise)` with x = signal·x₀ + noise·ε at `level`; level 0 is x₀ itself."""
        if level == 0:
            return 1.0, 0.0
        c = self.levels[level]
        return c.alpha / c.in_scale, c.sigma / c.in_scale

    def prior(self, shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """`prior(n, generators)` drawing x_T = init_noise_sigma·z, row i from generators[i]."""

        def draw(n: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
            if len(generators) != n:
                raise ValueError(f"prior needs one generator per row (got {len(generators)} for n={n})")
            return (self.init_noise_sigma * randn_rows(generators, shape, device=device)).to(dtype)

        return draw


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler) -> bool:
    """Whether `FlowTransition` can take its sigmas: a flow-matching Euler scheduler (x = (1 − σ)·x₀ + σ·ε)."""
    return type(scheduler).__name__ in FLOW_SCHEDULERS


class FlowTransition:
    """`transition(x, level, generators, return_x0=False)` for the DTS engine, from a flow-matching scheduler.

    `FlowMatchEulerDiscreteScheduler` integrates the flow's ODE, so every child of a tree node would be the same. This
    takes the rectified-flow ancestral step with noise level `eta` instead (`k_sampling.ancestral_step_flow`, the step
    the ComfyUI sampler takes on SD3 / FLUX), between the scheduler's own sigmas after
    `set_timesteps(num_steps, mu=mu)`: level L steps from `sigmas[num_steps - L]` to the next one. `denoise(x, t)`
    returns the (guided) velocity v = ε − x₀ at `scheduler.timesteps[num_steps - L]`, so x̂₀ = x − σ·v.
    """

    def __init__(self, scheduler, denoise: Denoiser, num_steps: int, eta: float = 1.0, mu: float | None = None):
        if not is_flow_scheduler(scheduler):
            raise ValueError(
                f"{type(scheduler).__name__} is not a flow-matching scheduler this transition supports; use "
                f"{', '.join(FLOW_SCHEDULERS)}, e.g. `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config("
                "pipe.scheduler.config)`"
            )
        if not 0 < eta <= 1:
            raise ValueError(
                f"eta must lie in (0, 1] (got eta={eta}): eta is the share of each flow step that is fresh noise. "
                "With eta=0 the step is the deterministic Euler step, so every child of a node would be identical; "
                "eta=1 (the default) is the full ancestral step"
            )
        scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
        sigmas = [float(sigma) for sigma in scheduler.sigmas]
        if len(scheduler.timesteps) != num_steps or len(sigmas) != num_steps + 1:
            raise ValueError(
                f"{type(scheduler).__name__} made {len(scheduler.timesteps)} timesteps for num_steps={num_steps}; "
                "the tree needs exactly one timestep per level"
            )
        if sigmas[-1] != 0 or sigmas[0] > 1 or any(hi <= lo for hi, lo in pairwise(sigmas)):
            raise ValueError(
                f"{type(scheduler).__name__} sigmas must fall from at most 1 to 0 (got {sigmas}); "
                "invert_sigmas=True is not supported"
            )
        self.scheduler, self.denoise, self.num_steps, self.eta = scheduler, denoise, num_steps, eta
        self.sigmas, self.timesteps = sigmas, scheduler.timesteps

    def timestep(self, level: int) -> torch.Tensor:
        return self.timesteps[self.num_steps - level]

    def sigma(self, level: int) -> float:
        """σ of the states at `level`: 1 (or the schedule's top) at x_T, 0 at x₀."""
        return self.sigmas[self.num_steps - level]

    def step(
        self, x: torch.Tensor, velocity: torch.Tensor, level: int, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_prev, x̂₀)` from a velocity, in float32 arithmetic, returned in x's dtype; pure."""
        sigma_from, sigma_to = self.sigma(level), self.sigma(level - 1)
        sample = x.float()
        x0 = sample - sigma_from * velocity.float()
        x_prev = x0 if noise is None else ancestral_step_flow(sample, x0, sigma_from, sigma_to, noise.float(), self.eta)
        return x_prev.to(x.dtype), x0.to(x.dtype)

    def __call__(
        self, x: torch.Tensor, level: int, generators: Sequence[torch.Generator], return_x0: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= level <= self.num_steps:
            raise ValueError(f"level must lie in 1..{self.num_steps} (got {level})")
        velocity = self.denoise(x, self.timestep(level))
        noise = randn_rows(generators, x.shape[1:], device=x.device) if level > 1 else None
        x_prev, x0 = self.step(x, velocity, level, noise)
        return (x_prev, x0) if return_x0 else x_prev

    def renoise(
        self, x: torch.Tensor, from_level: int, to_level: int, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Draw x at `to_level` from the forward process q(x_to | x_from), for from_level < to_level; pure."""
        check_renoise_levels(from_level, to_level, self.num_steps)
        noise = randn_rows(generators, x.shape[1:], device=x.device)
        return forward_noise_flow(x.float(), self.sigma(from_level), self.sigma(to_level), noise).to(x.dtype)

    def prior(self, shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """`prior(n, generators)` drawing x_T = z, row i from generators[i], as StableDiffusion3Pipeline starts."""

        def draw(n: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
            if len(generators) != n:
                raise ValueError(f"prior needs one generator per row (got {len(generators)} for n={n})")
            return randn_rows(generators, shape, device=device).to(dtype)

        return draw
