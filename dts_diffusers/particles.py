"""Particle baselines on the engine's interfaces and NFE accounting: best-of-N, SMC / FK-steering and BFS.

All of them are one loop: a population of N particles is denoised together; at evaluation levels each particle is
scored on the one-step prediction x̂_0 (the transition's optional ``return_x0=True`` output), weighted by
``exp(λ_t · score)`` and resampled when the effective sample size falls below a threshold. The three axes of the
classical-search paper are options: temperature (constant, increase, inf), scoring (current, difference, max) and
resampling (multinomial, systematic, ssp). Best-of-N is the same loop with no evaluation level.

Local search (``local_search_steps=k``, for differentiable rewards) refines every evaluation: k times, x̂_0 takes a
gradient step up the reward and is re-noised to the current level with the forward process (the transition's
``renoise``), then the model predicts again; each repetition costs one NFE per particle. It is the classical-search
paper's guidance-plus-recurrence, annealed Langevin in the limit, and the depth-first search in ``dfs.py`` uses it too.

Populations are independent runs; more budget adds populations, and draws pick a population by its normalising
constant estimate, then a particle by its final weight, so sampling mode targets π* ∝ p·exp(λ·r).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .engine import Timings, call_transition, check_finite_rewards, check_lambda, default_branch_levels
from .noise import row_generators
from .resampling import RESAMPLERS, effective_sample_size, stratified_draws

TEMPERATURES = ("constant", "increase", "inf")
SCORINGS = ("current", "difference", "max")
NOT_DIFFERENTIABLE = (
    "local search needs a differentiable reward: reward(x0) returned scores with no gradient with respect to x0. "
    "Build the reward with differentiable=True (e.g. load_reward(name, differentiable=True)) or from plain torch "
    "operations, or set local_search_steps=0"
)


@dataclass
class _Population:
    x0: torch.Tensor
    rewards: np.ndarray
    log_weights: np.ndarray  # final, normalised within the population
    log_z: float  # log of the population's normalising-constant estimate


def temperature_schedule(kind: str, lam: float, num_evaluations: int) -> np.ndarray:
    """λ_t per evaluation: constant; increasing linearly with mean λ (later, more reliable x̂_0 counts more); ∞."""
    if kind == "constant":
        return np.full(num_evaluations, lam)
    if kind == "inf":
        return np.full(num_evaluations, math.inf)
    ramp = np.arange(1, num_evaluations + 1, dtype=np.float64)
    return lam * ramp / ramp.mean()


def tilt(log_weights: np.ndarray, lam: float, scores: np.ndarray) -> np.ndarray:
    """log w + λ·score; λ = ∞ keeps only the best-scoring particles (greedy)."""
    if math.isinf(lam):
        return np.where(scores == scores.max(), 0.0, -math.inf)
    return log_weights + lam * scores


def score_particles(kind: str, current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Current r(x̂_0); difference r_t − r_parent; max(r_t, r_parent). `previous` is −inf before any evaluation."""
    if kind == "current":
        return current
    if kind == "difference":
        return current - np.where(np.isfinite(previous), previous, 0.0)
    return np.maximum(current, previous)


def check_local_search(steps: int, step_size: float, renoise: Callable | None) -> None:
    if not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"local_search_steps must be a non-negative integer (got {steps!r}); 0 turns it off")
    if steps and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"local_search_step_size must be a positive number (got {step_size!r})")
    if steps and not callable(renoise):
        raise ValueError(
            "local search re-noises each guided step back to its level with the forward process: pass "
            "renoise=transition.renoise (SchedulerTransition, SigmaChain and the toy chains have one), a function "
            "renoise(x, from_level, to_level, generators), or set local_search_steps=0"
        )


def reward_ascent(reward: Callable, x0: torch.Tensor, step_size: float) -> torch.Tensor:
    """x̂_0 + η·∇r(x̂_0): one step up the reward, the gradient taken with respect to x̂_0 alone (rows independent)."""
    with torch.enable_grad():
        point = x0.detach().float().requires_grad_(True)
        scores = reward(point.to(x0.dtype))
        if not isinstance(scores, torch.Tensor) or not scores.requires_grad:
            raise ValueError(NOT_DIFFERENTIABLE)
        (gradient,) = torch.autograd.grad(scores.sum(), point)
    return (point + step_size * gradient).detach().to(x0.dtype)


def refine_locally(
    predict: Callable, ascend: Callable, renoise: Callable, x: torch.Tensor, level: int, generators, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x_{level-1}, x̂_0)` after `steps` rounds of guidance and recurrence (the classical-search paper's local search).

    Each round nudges the step's result x_{level-1} along the reward's gradient at x̂_0, re-noises it back to `level`
    with the forward process and denoises again: annealed Langevin in the paper's Proposition 1. With no guidance a
    round leaves the level's marginal unchanged (denoise, then noise), so it refines a sample without washing out
    what set it apart. `predict(x, level, generators)` is one counted transition with `return_x0=True`, so this
    costs `1 + steps` NFE.
    """
    x_next, x0_hat = predict(x, level, generators)
    for _ in range(steps):
        guided = x_next + (ascend(x0_hat) - x0_hat).to(x_next.dtype)
        x = renoise(guided, level - 1, level, generators)
        x_next, x0_hat = predict(x, level, generators)
    return x_next, x0_hat


class RewardCalls:
    """Timed, counted reward calls shared by the samplers that score states themselves (particles, DFS)."""

    reward: Callable
    reward_evals: int
    timings: Timings
    local_search_step_size: float

    def _ascend(self, x0_hat: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = reward_ascent(self.reward, x0_hat, self.local_search_step_size)
        self.reward_evals += len(x0_hat)
        self.timings.reward += time.perf_counter() - start
        return out

    def _score(self, x0: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        values = check_finite_rewards(self.reward(x0), len(x0)).numpy()
        self.reward_evals += len(x0)
        self.timings.reward += time.perf_counter() - start
        return values


class ParticleSearch(RewardCalls):
    """SMC / FK-steering / BFS over a population of `num_particles` (best-of-N when `eval_levels=[]`).

    `local_search_steps` > 0 refines each evaluation by local search (needs `renoise` and a differentiable reward);
    a particle then costs `num_steps + local_search_steps·len(eval_levels)` NFE.
    """

    def __init__(
        self,
        prior: Callable,
        transition: Callable,
        reward: Callable,
        num_steps: int,
        lam: float = 1.0,
        mode: str = "sample",
        num_particles: int | None = None,
        eval_levels: Sequence[int] | None = None,
        temperature: str = "constant",
        scoring: str = "difference",
        resampling: str = "systematic",
        ess_threshold: float = 0.5,
        batch_size: int | None = None,
        seed: int = 0,
        renoise: Callable | None = None,
        local_search_steps: int = 0,
        local_search_step_size: float = 0.1,
    ):
        if mode not in ("sample", "search"):
            raise ValueError(f"mode must be 'sample' or 'search' (got {mode!r})")
        check_local_search(local_search_steps, local_search_step_size, renoise)
        for name, value, allowed in (
            ("temperature", temperature, TEMPERATURES),
            ("scoring", scoring, SCORINGS),
            ("resampling", resampling, tuple(RESAMPLERS)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {value!r})")
        if not 0 <= ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in [0, 1] (got {ess_threshold}); 1 resamples at every level")
        if num_particles is not None and num_particles < 1:
            raise ValueError(f"num_particles must be positive (got {num_particles})")
        self.prior, self.transition, self.reward = prior, transition, reward
        self.num_steps, self.lam, self.mode = num_steps, check_lambda(lam), mode
        levels = default_branch_levels(num_steps) if eval_levels is None else list(eval_levels)
        self.eval_levels = sorted({int(b) for b in levels if 1 <= b <= num_steps}, reverse=True)
        self.renoise = renoise
        self.local_search_steps, self.local_search_step_size = int(local_search_steps), float(local_search_step_size)
        self.particle_cost = num_steps + self.local_search_steps * len(self.eval_levels)
        self.lams = temperature_schedule(temperature, self.lam, len(self.eval_levels) + 1)
        self.scoring, self.resample = scoring, RESAMPLERS[resampling]
        self.ess_threshold = ess_threshold
        self.num_particles, self.batch_size = num_particles, batch_size
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._populations: list[_Population] = []
        self._nfe_target = 0
        self._draw_calls = 0
        self.nfe = self.replayed_nfe = self.reward_evals = self.iterations = 0
        self.timings = Timings()

    def run(self, nfe_budget: int, callback: Callable | None = None) -> ParticleSearch:
        if not isinstance(nfe_budget, int | np.integer) or nfe_budget < 0:
            raise ValueError(f"nfe_budget must be a non-negative integer (got {nfe_budget!r})")
        self._nfe_target += int(nfe_budget)
        if not self._populations and self._nfe_target < self.particle_cost:
            raise ValueError(
                f"nfe_budget={self._nfe_target} is below one rollout: one particle costs {self.particle_cost} NFE "
                f"(num_steps={self.num_steps} plus local search); give at least that"
            )
        if self.num_particles is None:  # one population spending the whole first budget, as SMC baselines do
            self.num_particles = max(1, self._nfe_target // self.particle_cost)
        while (size := min(self.num_particles, (self._nfe_target - self.nfe) // self.particle_cost)) >= 1:
            self._populations.append(self._run_population(size))
            if callback is not None and callback(self):
                self._nfe_target = self.nfe  # an early stop drops the rest: a later run(b) spends at most b
                break
        return self

    def _run_population(self, n: int) -> _Population:
        x = self.prior(n, row_generators(self._rng.integers(0, 2**63 - 1, n)))
        generators = row_generators(self._rng.integers(0, 2**63 - 1, n))
        previous = np.full(n, -math.inf)
        log_w = np.zeros(n)
        log_z = 0.0
        evaluation = 0
        for level in range(self.num_steps, 0, -1):
            if level not in self.eval_levels:
                x, _ = self._step(x, level, generators, False)
                continue
            x, x0_hat = refine_locally(
                self._predict, self._ascend, self.renoise, x, level, generators, self.local_search_steps
            )
            scores = self._score(x0_hat)
            log_w = tilt(log_w, self.lams[evaluation], score_particles(self.scoring, scores, previous))
            previous = score_particles("max", scores, previous) if self.scoring == "max" else scores
            evaluation += 1
            if effective_sample_size(log_w) < self.ess_threshold * n or math.isinf(self.lams[evaluation - 1]):
                top = log_w.max()
                log_z += top + math.log(np.exp(log_w - top).mean())
                ancestors = self.resample(np.exp(log_w - top), n, self._rng)
                x, previous = x[torch.as_tensor(ancestors, device=x.device)], previous[ancestors]
                generators = row_generators(self._rng.integers(0, 2**63 - 1, n))  # copies must diverge
                log_w = np.zeros(n)
        rewards = self._score(x)
        final_scoring = self.scoring if self.eval_levels else "current"
        log_w = tilt(log_w, self.lam, score_particles(final_scoring, rewards, previous))
        top = log_w.max()
        log_z += top + math.log(np.exp(log_w - top).mean())
        self.iterations += n
        return _Population(x.detach(), rewards, log_w - top - math.log(np.exp(log_w - top).sum()), log_z)

    def _step(self, x, level, generators, evaluate):
        start = time.perf_counter()
        chunks = range(0, len(x), self.batch_size or len(x))
        outs, preds = [], []
        for lo in chunks:
            rows = slice(lo, lo + (self.batch_size or len(x)))
            if evaluate:
                out, pred = self.transition(x[rows], level, generators[rows], return_x0=True)
                preds.append(pred)
            else:
                out = call_transition(self.transition, x[rows], level, generators[rows])
            outs.append(out)
        self.nfe += len(x)
        self.timings.transition += time.perf_counter() - start
        return torch.cat(outs), (torch.cat(preds) if preds else None)

    def _predict(self, x, level, generators):
        return self._step(x, level, generators, True)

    def sample(self, n: int, return_rewards: bool = False):
        """Search mode: the `n` best particles; sample mode: `n` draws ∝ population evidence × final weight."""
        if not self._populations:
            raise RuntimeError("nothing sampled yet: call run(nfe_budget) before sample()")
        rewards = np.concatenate([p.rewards for p in self._populations])
        if self.mode == "search":
            index = np.resize(np.argsort(-rewards, kind="stable")[:n], n)
        else:
            log_w = np.concatenate([p.log_weights + p.log_z for p in self._populations])
            probs = np.exp(log_w - log_w.max())
            rng = np.random.Generator(np.random.PCG64([self.seed, 1, self._draw_calls]))
            self._draw_calls += 1
            index = stratified_draws(probs, n, rng)
        return self._gather(index, rewards, return_rewards)

    def best(self) -> tuple[torch.Tensor, float]:
        if not self._populations:
            raise RuntimeError("nothing sampled yet: call run(nfe_budget) before best()")
        rewards = np.concatenate([p.rewards for p in self._populations])
        index = np.array([int(np.argmax(rewards))])
        return self._gather(index, rewards, False), float(rewards[index[0]])

    def _gather(self, index: np.ndarray, rewards: np.ndarray, return_rewards: bool):
        out = torch.cat([p.x0 for p in self._populations])[torch.as_tensor(index)]
        return (out, torch.as_tensor(rewards[index], dtype=torch.float32)) if return_rewards else out

    def stats(self) -> dict:
        rewards = np.concatenate([p.rewards for p in self._populations]) if self._populations else np.zeros(0)
        return {
            "populations": len(self._populations),
            "particles": int(rewards.size),
            "nfe": self.nfe,
            "replayed_nfe": 0,
            "reward_evals": self.reward_evals,
            "best_reward": float(rewards.max()) if rewards.size else -math.inf,
            "timings": self.timings.as_dict(),
        }
