"""Exact toy diffusion chains, where p_θ is known in closed form and π* can be computed, to test samplers honestly.

For data distributed as a Gaussian mixture, every marginal of the variance-preserving forward process is again a
mixture, and the reverse conditional q(x_{t-1} | x_t) is a mixture of Gaussians whose weights are the component
responsibilities at x_t. Sampling it exactly gives a "model" equal to the data law, so any distance between a
sampler's output and π* ∝ p·exp(λ·r) is the sampler's own error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import default_branch_levels
from .noise import check_renoise_levels, randn_rows


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


class GaussianMixtureChain:
    """Variance-preserving chain over data Σ_k w_k N(μ_k, s_k² I), with exact prior and exact reverse steps."""

    def __init__(self, means, stds, weights, betas: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim == 1:
            self.means = self.means[:, None]
        k, self.dim = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.log_weights = (weights / weights.sum()).log()
        self.num_steps = len(betas)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    def _marginal(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Component means [K, d] and variances [K] of x at `level`."""
        a = self.alpha_bar[level]
        return a.sqrt() * self.means, a * self.stds**2 + 1 - a

    def _log_resp(self, x: torch.Tensor, level: int) -> torch.Tensor:
        means, var = self._marginal(level)
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        return self.log_weights - 0.5 * sq / var - 0.5 * self.dim * var.log()

    def log_density(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        x = x.to(torch.float64).reshape(len(x), self.dim)
        return torch.logsumexp(self._log_resp(x, level), -1) - 0.5 * self.dim * math.log(2 * math.pi)

    def _sample_components(self, log_probs: torch.Tensor, generators) -> torch.Tensor:
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        cdf = log_probs.softmax(-1).cumsum(-1)
        return torch.searchsorted(cdf, u[:, None]).squeeze(-1).clamp(max=len(self.means) - 1)

    def prior(self, n: int, generators) -> torch.Tensor:
        """Exact draw of x at level num_steps."""
        comp = self._sample_components(self.log_weights.expand(n, -1), generators)
        means, var = self._marginal(self.num_steps)
        noise = randn_rows(generators, (self.dim,), dtype=torch.float64)
        return (means[comp] + var[comp].sqrt()[:, None] * noise).to(torch.float32)

    def x0_mean(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """E[x_0 | x_level] (Tweedie), what a one-step prediction x̂_0 would be for a perfect model."""
        x = x.to(torch.float64)
        a = self.alpha_bar[level]
        resp = self._log_resp(x, level).softmax(-1)
        gain = (a.sqrt() * self.stds**2 / (a * self.stds**2 + 1 - a))[None, :, None]
        cond = self.means[None] + gain * (x[:, None, :] - a.sqrt() * self.means[None])
        return (resp[..., None] * cond).sum(1).to(torch.float32)

    def transition(self, x: torch.Tensor, level: int, generators, return_x0: bool = False):
        """Exact draw of x_{level-1} given x_level: pick a component by responsibility, then its Gaussian posterior."""
        xd = x.to(torch.float64)
        a_t, a_prev = self.alpha_bar[level], self.alpha_bar[level - 1]
        step = a_t / a_prev
        comp = self._sample_components(self._log_resp(xd, level), generators)
        prev_means, prev_var = self._marginal(level - 1)
        precision = 1 / prev_var[comp] + step / (1 - step)
        mean = (prev_means[comp] / prev_var[comp][:, None] + step.sqrt() * xd / (1 - step)) / precision[:, None]
        noise = randn_rows(generators, (self.dim,), dtype=torch.float64)
        out = (mean + precision.rsqrt()[:, None] * noise).to(x.dtype)
        return (out, self.x0_mean(x, level)) if return_x0 else out

    def renoise(self, x: torch.Tensor, from_level: int, to_level: int, generators) -> torch.Tensor:
        """Exact draw of x at `to_level` from the forward process q(x_to | x_from), for from_level < to_level."""
        check_renoise_levels(from_level, to_level, self.num_steps)
        kept = self.alpha_bar[to_level] / self.alpha_bar[from_level]
        noise = randn_rows(generators, x.shape[1:], device=x.device, dtype=torch.float64)
        return (kept.sqrt() * x.to(torch.float64) + (1 - kept).sqrt() * noise).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp][:, None] * noise).to(torch.float32)


@dataclass
class ToyTask:
    """A chain, a reward and λ: everything needed to run a sampler and score it against exact π* samples."""

    name: str
    chain: GaussianMixtureChain
    reward: Callable[[torch.Tensor], torch.Tensor]
    lam: float
    branch_levels: list[int]
    high_mode: Callable[[torch.Tensor], torch.Tensor] | None = None  # per sample: is it in the rare high-reward mode?

    @property
    def num_steps(self) -> int:
        return self.chain.num_steps

    def target_samples(self, n: int, seed: int, pool: int = 1_000_000) -> torch.Tensor:
        """Exact-in-the-limit draws from π*: importance resampling of a large exact data sample by exp(λ·r)."""
        generator = torch.Generator().manual_seed(seed)
        data = self.chain.sample_data(pool, generator)
        log_w = self.lam * self.reward(data).to(torch.float64)
        index = torch.multinomial((log_w - log_w.max()).exp(), n, replacement=True, generator=generator)
        return data[index]

    def high_mode_mass(self, x: torch.Tensor) -> float:
        """The fraction of the samples `x` in the task's high-reward mode (the task must define `high_mode`)."""
        if self.high_mode is None:
            raise ValueError(f"task {self.name!r} has no high mode")
        return float(self.high_mode(x).to(torch.float64).mean())


def bimodal_1d(num_steps: int = 20, lam: float = 1.5) -> ToyTask:
    """A rare high-reward mode: 4% of the data near +1.5, bounded reward tanh(2x). π* puts about 0.44 on it."""
    chain = GaussianMixtureChain([-1.5, 1.5], [0.4, 0.4], [0.96, 0.04], linear_betas(num_steps, 0.01, 0.3))
    return ToyTask(
        "bimodal-1d",
        chain,
        lambda x: torch.tanh(2 * x.reshape(len(x))),
        lam,
        default_branch_levels(num_steps),
        high_mode=lambda x: x.reshape(len(x)) > 0,
    )


def rare_mode_8d(num_steps: int = 20, lam: float = 4.0) -> ToyTask:
    """A 0.5% mode in 8D: data at ±4·e (e = the unit diagonal), std 0.5; bounded reward 0.7·tanh(x·e / 2).

    The modes are 8 apart, so a trajectory commits to one at high noise (about levels 16–12 of 20); π* puts about
    0.52 on the rare mode at λ = 4, the base model 0.005."""
    dim = 8
    direction = torch.full((dim,), 1 / math.sqrt(dim), dtype=torch.float64)
    chain = GaussianMixtureChain(
        torch.stack([-4 * direction, 4 * direction]), 0.5, [0.995, 0.005], linear_betas(num_steps, 0.01, 0.3)
    )

    def project(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64).reshape(len(x), dim) @ direction

    return ToyTask(
        "rare-mode-8d",
        chain,
        lambda x: (0.7 * torch.tanh(project(x) / 2)).to(torch.float32),
        lam,
        default_branch_levels(num_steps),
        high_mode=lambda x: project(x) > 0,
    )


def long_chain(num_steps: int = 100, lam: float = 4.5) -> ToyTask:
    """A long chain branching every 10 levels: 2D modes at (−6, 0), (0, 0), (6, 0) weighted 0.49 / 0.02 / 0.49,
    std 0.5; bounded reward exp(−‖x‖² / 18), high at the rare centre mode.

    A trajectory commits to a mode at high noise (about levels 80–60 of 100); π* puts about 0.46 on the centre mode
    at λ = 4.5, the base model 0.02."""
    means = torch.tensor([[-6.0, 0.0], [0.0, 0.0], [6.0, 0.0]], dtype=torch.float64)
    chain = GaussianMixtureChain(means, 0.5, [0.49, 0.02, 0.49], linear_betas(num_steps, 0.001, 0.05))

    def reward(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(x.to(torch.float64).reshape(len(x), 2) ** 2).sum(-1) / 18).to(torch.float32)

    return ToyTask(
        f"long-chain-{num_steps}",
        chain,
        reward,
        lam,
        list(range(num_steps, 0, -10)),
        high_mode=lambda x: x.reshape(len(x), 2)[:, 0].abs() < 3,
    )


def _circle(num: int, radius: float) -> torch.Tensor:
    angles = torch.arange(num, dtype=torch.float64) * 2 * math.pi / num
    return radius * torch.stack([angles.cos(), angles.sin()], -1)


def gmm_2d(num_steps: int = 100, lam: float = 1.0) -> ToyTask:
    """The paper's 2D GMM task: 8 equal modes on a circle of radius 4; reward a GMM log-density, weights ∝ e^{1.5 i}."""
    centers = _circle(8, 4.0)
    chain = GaussianMixtureChain(centers, 0.3, torch.ones(8), linear_betas(num_steps, 0.001, 0.07))
    log_w = torch.log_softmax(1.5 * torch.arange(8, dtype=torch.float64), 0)

    def reward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64).reshape(len(x), 2)
        sq = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        dens = torch.logsumexp(log_w - sq / (2 * 0.3**2), -1) - math.log(2 * math.pi * 0.3**2)
        return dens.to(torch.float32)

    return ToyTask("gmm-2d", chain, reward, lam, default_branch_levels(num_steps))


def checkerboard_2d(num_steps: int = 100, lam: float = 1.0) -> ToyTask:
    """The paper's checkerboard task: data on the dark squares of a 4×4 board, reward −½‖x‖²."""
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    sub = torch.tensor([-0.375, -0.125, 0.125, 0.375], dtype=torch.float64)
    offsets = torch.stack(torch.meshgrid(sub, sub, indexing="ij"), -1).reshape(-1, 2)
    centers = torch.cat([torch.tensor([i - 1.5, j - 1.5], dtype=torch.float64) * 1.0 + offsets for i, j in cells])
    chain = GaussianMixtureChain(2 * centers, 0.12, torch.ones(len(centers)), linear_betas(num_steps, 0.001, 0.07))
    return ToyTask(
        "checkerboard-2d",
        chain,
        lambda x: -0.5 * (x.reshape(len(x), 2) ** 2).sum(-1),
        lam,
        default_branch_levels(num_steps),
    )
