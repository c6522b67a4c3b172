"""Depth-first search with backtracking over a denoising chain (the classical-search paper's DFS).

A *dive* denoises one particle from x_T to x_0. At an evaluation level t it scores its one-step prediction x̂_0; a
score below the level's threshold δ_t makes it backtrack: the state the step reached is re-noised with the forward
process (the transition's ``renoise``) up to level t + ΔT and denoised again from there, so a poor trajectory gets
another chance near where it went wrong. A dive may backtrack ``max_backtracks`` times; after that a low score makes
it carry on from the best state it has seen at that level. Hard starts thus take more compute than easy ones, with
no fixed schedule. A backtrack that reaches the top level restarts the dive from the prior.

Thresholds: explicit (``thresholds=``: one δ for every evaluation level, or one per level), or by default adaptive,
δ_t = the ``threshold_quantile`` of all scores seen at that level so far (those of the current batch included), which
needs no knowledge of the reward's scale: with the default 0.5 a dive backtracks when it is worse than the median.

Up to ``2·batch_size`` dives are in flight; each step advances up to ``batch_size`` of them that sit at one level
(the level holding most) with one transition call, so calls stay nearly full although backtracks scatter the dives.
Every dive draws all its noise from its own generator. NFE counts every denoising step, repeated ones included, and
the run budget is never exceeded: a dive starts, or backtracks, only if the budget still lets every running dive
finish. Sample mode draws finished dives ∝ exp(λ·r) (importance resampling as for best-of-N; dives are already
steered toward high reward, so this leans further toward it than π* ∝ p·exp(λ·r)); search mode returns the best
first.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import Timings, call_transition, check_integer, check_lambda, default_branch_levels
from .noise import row_generators
from .particles import RewardCalls, check_local_search, refine_locally
from .resampling import stratified_draws

NEEDS_RENOISE = (
    "DFS backtracks by re-noising with the forward process: pass renoise=transition.renoise (SchedulerTransition, "
    "SigmaChain and the toy chains have one), or a function renoise(x, from_level, to_level, generators) -> Tensor "
    "drawing x at to_level from q(x_to | x_from)"
)


@dataclass
class _Dive:
    """One particle in flight: its state at `level`, its noise stream, and the best state it met per level."""

    x: torch.Tensor  # [1, *shape]
    level: int
    generator: torch.Generator
    backtracks_left: int
    nfe: int = 0
    backtracks: int = 0
    best_at: dict[int, tuple[float, torch.Tensor]] = field(default_factory=dict)  # level -> (score, state after it)


class DepthFirstSearch(RewardCalls):
    """Dives with backtracking toward high reward; `run(nfe_budget)` is anytime and a later call continues."""

    def __init__(
        self,
        prior: Callable,
        transition: Callable,
        reward: Callable,
        num_steps: int,
        lam: float = 1.0,
        mode: str = "sample",
        renoise: Callable | None = None,
        eval_levels: Sequence[int] | None = None,
        backtrack_depth: int | None = None,
        max_backtracks: int = 4,
        threshold_quantile: float = 0.5,
        thresholds: float | Sequence[float] | None = None,
        local_search_steps: int = 0,
        local_search_step_size: float = 0.1,
        batch_size: int = 16,
        seed: int = 0,
    ):
        """
        Args:
            renoise: `renoise(x, from_level, to_level, generators)`, the forward process; required.
            eval_levels: where dives are scored (default the engine's branch levels, every num_steps/5).
            backtrack_depth: ΔT: a backtrack at evaluation level t re-noises to level t + ΔT, at most num_steps
                (default one evaluation interval, round(num_steps / len(eval_levels))).
            max_backtracks: backtracks allowed per dive; a dive costs at most
                num_steps + max_backtracks·(backtrack_depth + 1) NFE, plus local search.
            threshold_quantile: adaptive δ_t, the quantile of the scores seen at that level (0 never backtracks).
            thresholds: explicit δ, one number for every evaluation level or one per level (highest level first);
                replaces the quantile rule.
            local_search_steps / local_search_step_size: local search at every evaluation (see `particles.py`).
            batch_size: rows per transition call (2·batch_size dives in flight).
        """
        num_steps = check_integer("num_steps", num_steps, "the denoising steps of one dive")
        if mode not in ("sample", "search"):
            raise ValueError(f"mode must be 'sample' (draws ∝ exp(λ·r)) or 'search' (best first) (got {mode!r})")
        if not callable(renoise):
            raise ValueError(NEEDS_RENOISE)
        levels = default_branch_levels(num_steps) if eval_levels is None else [int(b) for b in eval_levels]
        bad = [b for b in levels if not 1 <= b <= num_steps]
        if bad or not levels:
            raise ValueError(
                f"eval_levels must be a non-empty list of levels in 1..num_steps={num_steps} (got {list(levels)}); "
                "DFS decides where to backtrack at them"
            )
        self.eval_levels = sorted(set(levels), reverse=True)
        if backtrack_depth is None:
            backtrack_depth = max(1, round(num_steps / len(self.eval_levels)))
        backtrack_depth = check_integer("backtrack_depth", backtrack_depth, "the steps undone per backtrack")
        max_backtracks = check_integer("max_backtracks", max_backtracks, "0 never backtracks", minimum=0)
        if not 0 <= threshold_quantile <= 1:
            raise ValueError(f"threshold_quantile must be in [0, 1] (got {threshold_quantile}); 0 never backtracks")
        batch_size = check_integer("batch_size", batch_size, "rows per transition call, e.g. 16")
        check_local_search(local_search_steps, local_search_step_size, renoise)
        self.prior, self.transition, self.reward, self.renoise = prior, transition, reward, renoise
        self.num_steps, self.lam, self.mode = num_steps, check_lambda(lam), mode
        self.backtrack_depth, self.max_backtracks = backtrack_depth, max_backtracks
        self.threshold_quantile = float(threshold_quantile)
        self.thresholds = self._explicit_thresholds(thresholds)
        self.local_search_steps, self.local_search_step_size = int(local_search_steps), float(local_search_step_size)
        self.batch_size, self.seed = batch_size, seed
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._scores_seen: dict[int, list[float]] = {level: [] for level in self.eval_levels}
        self._dives: list[_Dive] = []
        self._x0: list[torch.Tensor] = []
        self._rewards: list[float] = []
        self._dive_nfe: list[int] = []
        self._dive_backtracks: list[int] = []
        self._nfe_target = 0
        self._draw_calls = 0
        self.nfe = self.replayed_nfe = self.reward_evals = self.backtracks = 0
        self.timings = Timings()

    def _explicit_thresholds(self, thresholds) -> dict[int, float] | None:
        if thresholds is None:
            return None
        values = [float(thresholds)] * len(self.eval_levels) if np.isscalar(thresholds) else list(thresholds)
        if len(values) != len(self.eval_levels) or any(math.isnan(v) for v in values):
            raise ValueError(
                f"thresholds must be one number or one per evaluation level {self.eval_levels} (got {thresholds!r})"
            )
        return dict(zip(self.eval_levels, values, strict=True))

    # ---------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------
    def run(self, nfe_budget: int, callback: Callable[[DepthFirstSearch], object] | None = None) -> DepthFirstSearch:
        """Spend at most `nfe_budget` more NFE on dives; a later call continues (running dives included).

        `callback(self)` runs after every transition call once a dive has finished; a truthy return stops early and
        drops the rest of the budget granted so far: a later `run(b)` spends at most b more, finishing the running
        dives first.
        """
        if not isinstance(nfe_budget, int | np.integer) or nfe_budget < 0:
            raise ValueError(f"nfe_budget must be a non-negative integer (got {nfe_budget!r})")
        self._nfe_target += int(nfe_budget)
        if not self._rewards and not self._dives and self._nfe_target < self._cost_to_finish(self.num_steps):
            raise ValueError(
                f"nfe_budget={self._nfe_target} is below one rollout: a dive costs at least "
                f"{self._cost_to_finish(self.num_steps)} NFE (num_steps={self.num_steps} plus local search); "
                "give at least that"
            )
        while True:
            self._start_dives()
            if not self._dives:
                return self
            counts = Counter(dive.level for dive in self._dives)
            level = max(counts, key=lambda lvl: (counts[lvl], lvl))
            self._advance([dive for dive in self._dives if dive.level == level][: self.batch_size], level)
            if self._rewards and callback is not None and callback(self):
                self._nfe_target = self.nfe
                return self

    def sample(self, n: int, return_rewards: bool = False):
        """Search mode: the `n` best finished dives; sample mode: `n` draws ∝ exp(λ·r) over the finished dives."""
        rewards = self._finished_rewards("sample")
        if self.mode == "search":
            index = np.resize(np.argsort(-rewards, kind="stable")[:n], n)
        else:
            rng = np.random.Generator(np.random.PCG64([self.seed, 1, self._draw_calls]))
            self._draw_calls += 1
            gap = rewards - rewards.max()
            probs = (gap == 0).astype(float) if math.isinf(self.lam) else np.exp(self.lam * gap)  # λ = ∞: the best
            index = stratified_draws(probs, n, rng)
        x0 = torch.cat([self._x0[i] for i in index])
        return (x0, torch.as_tensor(rewards[index], dtype=torch.float32)) if return_rewards else x0

    def best(self) -> tuple[torch.Tensor, float]:
        rewards = self._finished_rewards("best")
        index = int(np.argmax(rewards))
        return self._x0[index], float(rewards[index])

    def stats(self) -> dict:
        rewards = np.asarray(self._rewards)
        return {
            "dives": len(self._rewards),
            "running": len(self._dives),
            "backtracks": self.backtracks,
            "mean_dive_nfe": float(np.mean(self._dive_nfe)) if self._dive_nfe else 0.0,
            "max_dive_backtracks": max(self._dive_backtracks, default=0),
            "thresholds": {level: self._current_threshold(level) for level in self.eval_levels},
            "nfe": self.nfe,
            "replayed_nfe": 0,
            "reward_evals": self.reward_evals,
            "best_reward": float(rewards.max()) if rewards.size else -math.inf,
            "timings": self.timings.as_dict(),
        }

    def _finished_rewards(self, caller: str) -> np.ndarray:
        if not self._rewards:
            raise RuntimeError(f"no dive has finished yet: call run(nfe_budget) before {caller}()")
        return np.asarray(self._rewards)

    # ---------------------------------------------------------------------------------------------------------
    # dives
    # ---------------------------------------------------------------------------------------------------------
    def _cost_to_finish(self, level: int) -> int:
        """NFE a dive at `level` still needs if it never backtracks again (local search included)."""
        return level + self.local_search_steps * sum(1 for e in self.eval_levels if e <= level)

    def _free_budget(self) -> int:
        """Budget left once every running dive is guaranteed its way down."""
        return self._nfe_target - self.nfe - sum(self._cost_to_finish(dive.level) for dive in self._dives)

    def _start_dives(self) -> None:
        start = time.perf_counter()
        cost, free, new = self._cost_to_finish(self.num_steps), self._free_budget(), 0
        while len(self._dives) + new < 2 * self.batch_size and free >= cost:
            new, free = new + 1, free - cost
        if new:
            generators = row_generators(self._rng.integers(0, 2**63 - 1, new))
            x = self.prior(new, generators)
            self._dives += [
                _Dive(x[i : i + 1], self.num_steps, g, self.max_backtracks) for i, g in enumerate(generators)
            ]
        self.timings.transition += time.perf_counter() - start

    def _advance(self, dives: list[_Dive], level: int) -> None:
        """One step for every dive at `level`; at an evaluation level, score and backtrack or carry on."""
        x = torch.cat([dive.x for dive in dives])
        generators = [dive.generator for dive in dives]
        if level not in self.eval_levels:
            x_next = self._step(x, level, generators)
            for dive, row in zip(dives, x_next, strict=True):
                dive.x, dive.level, dive.nfe = row[None], level - 1, dive.nfe + 1
        else:
            self._evaluate(dives, x, level, generators)
        finished = [dive for dive in dives if dive.level == 0]
        if finished:
            self._finish(finished)

    def _evaluate(self, dives: list[_Dive], x: torch.Tensor, level: int, generators) -> None:
        x_next, x0_hat = refine_locally(
            self._predict, self._ascend, self.renoise, x, level, generators, self.local_search_steps
        )
        scores = self._score(x0_hat)
        threshold = self._threshold(level, scores)
        start = time.perf_counter()
        for dive, score, row in zip(dives, scores.tolist(), x_next, strict=True):
            dive.x, dive.level, dive.nfe = row[None], level - 1, dive.nfe + 1 + self.local_search_steps
            if score > dive.best_at.get(level, (-math.inf,))[0]:
                dive.best_at[level] = (score, row[None].clone())
        target = min(level + self.backtrack_depth, self.num_steps)
        extra = self._cost_to_finish(target) - self._cost_to_finish(level - 1)
        free = self._free_budget()
        going_back = []
        for dive, score in zip(dives, scores.tolist(), strict=True):
            if not score < threshold:
                continue
            if dive.backtracks_left > 0 and extra <= free:
                free -= extra
                dive.backtracks_left -= 1
                dive.backtracks += 1
                going_back.append(dive)
            else:  # no backtrack left: carry on from the best state seen at this level
                dive.x = dive.best_at[level][1]
        self.backtracks += len(going_back)
        self.timings.bookkeeping += time.perf_counter() - start
        if going_back:
            self._backtrack(going_back, level - 1, target)

    def _backtrack(self, dives: list[_Dive], level: int, target: int) -> None:
        """Re-noise the dives' states from `level` up to `target`; at the top, restart them from the prior."""
        start = time.perf_counter()
        generators = [dive.generator for dive in dives]
        if target == self.num_steps:
            x = self.prior(len(dives), generators)
        else:
            x = self.renoise(torch.cat([dive.x for dive in dives]), level, target, generators)
        for dive, row in zip(dives, x, strict=True):
            dive.x, dive.level = row[None], target
        self.timings.transition += time.perf_counter() - start

    def _finish(self, finished: list[_Dive]) -> None:
        x0 = torch.cat([dive.x for dive in finished])
        rewards = self._score(x0)
        for dive, reward in zip(finished, rewards.tolist(), strict=True):
            self._x0.append(dive.x.detach().clone())
            self._rewards.append(reward)
            self._dive_nfe.append(dive.nfe)
            self._dive_backtracks.append(dive.backtracks)
        self._dives = [dive for dive in self._dives if dive.level > 0]

    def _threshold(self, level: int, scores: np.ndarray) -> float:
        """δ_t for `scores` just seen at `level`: explicit, or the quantile of all scores seen there, these included."""
        self._scores_seen[level] += scores.tolist()
        return self._current_threshold(level)

    def _current_threshold(self, level: int) -> float | None:
        if self.thresholds is not None:
            return self.thresholds[level]
        seen = self._scores_seen[level]
        return float(np.quantile(seen, self.threshold_quantile)) if seen else None

    # ---------------------------------------------------------------------------------------------------------
    # counted model and reward calls
    # ---------------------------------------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, level: int, generators) -> torch.Tensor:
        start = time.perf_counter()
        out = call_transition(self.transition, x, level, generators)
        self.nfe += len(x)
        self.timings.transition += time.perf_counter() - start
        return out

    def _predict(self, x: torch.Tensor, level: int, generators) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        out = self.transition(x, level, generators, return_x0=True)
        if not isinstance(out, tuple) or len(out) != 2 or out[0].shape != x.shape:
            raise ValueError(
                "DFS scores the one-step prediction: transition(x, level, generators, return_x0=True) must return "
                f"(x_prev, x0_hat) shaped like x {tuple(x.shape)}"
            )
        self.nfe += len(x)
        self.timings.transition += time.perf_counter() - start
        return out
