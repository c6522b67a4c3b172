"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*) over any stochastic denoising chain.

The engine sees three callables and nothing of diffusers or ComfyUI:

- ``prior(n, generators) -> Tensor[n, *shape]`` draws x_T, row ``i`` from ``generators[i]``;
- ``transition(x, level, generators) -> Tensor`` takes rows at ``level`` (num_steps..1) to ``level - 1`` with one
  stochastic denoising step, row ``i`` drawing its noise only from ``generators[i]``;
- ``reward(x0) -> Tensor[n]``.

Nodes exist only at branch levels; the denoising steps between two branch levels form one edge whose noise comes from
the child's stored seed, so any evicted latent can be replayed. One NFE is one transition of one row.

The default tree is allocated by a heuristic of the node's *state* (the reward of its one-step prediction x̂_0, which
the denoiser returns with its step: no extra NFE, one reward call) and estimates every node's value by nested Monte
Carlo over all its children. Since the tree's shape never depends on the rewards below a node, each node's
exp(λ·V) estimate is unbiased and every leaf can be drawn. Its "frontier" expands every level (x_T nodes only on a
finely branching chain), the cheap low-noise ones more often, at the node whose SMC-like mass is furthest ahead of its
expansions, so rollouts start at every level and a good node multiplies across its level. The paper's Algorithm 1
is `estimator="paper"` with `PAPER_WIDENING` (method "dts-paper").
"""

from __future__ import annotations

import heapq
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .noise import row_generators
from .resampling import effective_size
from .tree import (
    NO_SLOT,
    PAPER_WIDENING,
    ROOT,
    ChildDraws,
    FrontierMasses,
    LatentStore,
    TreeArrays,
    Widening,
    boltzmann,
    widening_limit,
)

Prior = Callable[[int, list[torch.Generator]], torch.Tensor]
Transition = Callable[..., torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]

LEVEL_ALLOCATIONS = ("fixed", "neyman")
NEYMAN_WARMUP = 16  # children a level makes before its sibling spread steers the frontier's level shares
NEYMAN_EVERY = 8  # batches between two measurements of the spreads
EQUAL_SHARE_FRACTION = 0.2  # by default the levels expanded in the chain's first fifth (from x_T) take equal shares
GUIDE_SPREAD_WARMUP = 32  # nodes a level makes before the spread of its guide is measured (and its scale fixed)
ESTIMATORS = ("nested", "frontier", "held-out", "paper")
EARLY_LINEAGES = ("fresh", "branch")
WIDENINGS = {"default": Widening(), "paper": PAPER_WIDENING}


def default_branch_levels(num_steps: int, num_branch_levels: int = 5) -> list[int]:
    """The paper's schedule: the root level and every num_steps/5 levels below it (50 → 50, 40, 30, 20, 10)."""
    if num_steps <= num_branch_levels:
        return list(range(num_steps, 0, -1))
    every = num_steps / num_branch_levels
    return sorted({num_steps - round(k * every) for k in range(num_branch_levels)}, reverse=True)


def check_lambda(lam: float) -> float:
    lam = float(lam)
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lam must be >= 0 (got {lam}); lam=0 samples the base model, larger lam follows the reward")
    return lam


def check_finite_rewards(rewards: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (n,):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"reward must return a tensor of shape ({n},), one score per sample (got {shape})")
    rewards = rewards.detach().to(torch.float64).cpu()
    if not torch.isfinite(rewards).all():
        raise ValueError("reward returned NaN or infinite values; make the reward finite (clamp it or fix its input)")
    return rewards


def call_prior(prior: Prior, n: int, generators: list[torch.Generator], shape: tuple | None) -> torch.Tensor:
    """One checked prior draw: a tensor of n rows, each shaped like the earlier draws (`shape`, None at the first)."""
    x = prior(n, generators)
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] != n:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"prior(n, generators) must return a tensor of n = {n} rows (got {got})")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"prior returned rows shaped {tuple(x.shape[1:])}, earlier draws were {shape}")
    return x


def level_shares(open_levels: list[int], num_steps: int, beta: float, equal_top: int = 0) -> dict[int, float]:
    """The frontier's target share of expansions per level (the root's x_T seeds first): a new child at level ℓ
    costs ℓ NFE (a seed: the whole chain), so shares ∝ cost^-β (β = 0: equal counts, 1: equal NFE); the top
    `equal_top` levels keep the equal share 1/len(levels) whatever their cost, and the rest split what remains."""
    even = 1.0 / len(open_levels)
    top, rest = open_levels[:equal_top], open_levels[equal_top:]
    weights = {lv: min(lv, num_steps) ** -beta for lv in rest}
    left = 1.0 - even * len(top)
    return {lv: even for lv in top} | {lv: left * w / sum(weights.values()) for lv, w in weights.items()}


def commits_early(level: int, num_steps: int) -> bool:
    """Whether `level` lies in the chain's first EQUAL_SHARE_FRACTION (ℓ > (1 − fraction)·T), where a trajectory
    still commits to a mode, so where independent lineages count."""
    return level > (1 - EQUAL_SHARE_FRACTION) * num_steps


def branches_at_x_t(node_levels: list[int], num_steps: int) -> bool:
    """Whether the x_T level is one of the frontier's levels: only where its children's level commits early
    (`commits_early`: a chain branching every T/10), and there, under the default fresh early lineages, its share
    goes to new x_T seeds (`fresh_early_shares`). With the paper's five levels the child sits a fifth of the chain
    below x_T, which carries little of x_0: a second child costs the whole chain, as a new x_T seed does, and is less
    independent of its siblings, so the x_T level has no share and the levels below take it (measured on the toy
    tasks and digits: README, round 9)."""
    return len(node_levels) > 2 and commits_early(node_levels[1], num_steps)


def high_noise_levels(open_levels: list[int], num_steps: int) -> int:
    """How many of `open_levels` (the root's x_T seeds first) expand where a trajectory commits (`commits_early`),
    however densely the chain branches (two of six levels on 5 branch levels with x_T branching, three of eleven on a
    100-step chain's ten)."""
    return sum(commits_early(level, num_steps) for level in open_levels)


def fresh_early_shares(shares: dict[int, float], num_steps: int) -> dict[int, float]:
    """`shares` with every node level in the chain's first fifth (`commits_early`) closed, its share handed to the
    root's new x_T seeds (key num_steps + 1): there each early lineage is a fresh chain, not a second child of an
    early node. An early node carries little of x_0, so its second child costs about a seed and is less independent
    of its sibling than a new seed is of the others (the long chain on forty seeds, and every task branching every
    T/10: README, round 11)."""
    seeds = num_steps + 1
    early = [level for level in shares if level != seeds and commits_early(level, num_steps)]
    fresh = {level: share for level, share in shares.items() if level not in early}
    fresh[seeds] += sum(shares[level] for level in early)
    return fresh


def sibling_spread(values: np.ndarray, parents: np.ndarray) -> float:
    """The pooled within-parent standard deviation of `values` (NaN while fewer than two rows share a parent)."""
    groups, index, sizes = np.unique(parents, return_inverse=True, return_counts=True)
    dof = len(values) - len(groups)
    if dof < 1:
        return math.nan
    means = np.bincount(index, weights=values) / sizes
    return float(np.sqrt(((values - means[index]) ** 2).sum() / dof))


def as_device(value, name: str) -> torch.device | None:
    """`torch.device(value)` with a ValueError that names the argument (torch raises RuntimeError)."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0' (got {value!r})") from error


def check_integer(name: str, value, fix: str, minimum: int = 1) -> int:
    """An integer >= minimum: any `numbers.Integral` (numpy's included), never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer (got {type(value).__name__} {value!r}); {fix}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (got {value}); {fix}")
    return int(value)


def call_transition(
    transition: Transition, x: torch.Tensor, level: int, generators: list[torch.Generator], return_x0: bool = False
):
    """One checked transition; with `return_x0`, also the one-step prediction x̂_0 of the input rows."""
    if return_x0:
        out = transition(x, level, generators, return_x0=True)
        if not isinstance(out, tuple) or len(out) != 2 or getattr(out[1], "shape", None) != x.shape:
            raise ValueError(
                f"transition(..., return_x0=True) must return (x_prev, x0_hat), both shaped {tuple(x.shape)}"
            )
        return call_transition(lambda *_: out[0], x, level, generators), out[1]
    out = transition(x, level, generators)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"transition must return a tensor shaped like its input {tuple(x.shape)} at level {level} (got {shape})"
        )
    return out


def accepts_keyword(function: Callable, name: str) -> bool:
    """Whether `function` takes keyword `name` (or **kwargs); True when its signature cannot be read."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def deficit_pick(shares: np.ndarray, parent_visits: int, child_visits: np.ndarray) -> int:
    """The child furthest below its share of the parent's visits: argmax(share·N − N_child), the first on ties.

    Over many visits each child gets its share to within one visit, as systematic resampling would give it, with no
    randomness: the tree's allocation adds no noise of its own."""
    return int(np.argmax(shares * parent_visits - child_visits))


def grouped_boltzmann(values: np.ndarray, starts: np.ndarray, lam: float) -> np.ndarray:
    """`boltzmann` within each group: the runs of `values` beginning at `starts`, computed together."""
    sizes = np.diff(starts, append=values.size)
    top = np.repeat(np.maximum.reduceat(values, starts), sizes)
    weights = (values == top).astype(np.float64) if math.isinf(lam) else np.exp(lam * (values - top))
    return weights / np.repeat(np.add.reduceat(weights, starts), sizes)


def grouped_systematic(probs: np.ndarray, starts: np.ndarray, counts: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Systematic resampling within each group (the runs of `probs` beginning at `starts`, each summing to 1): how
    many of group g's `counts[g]` pointers (uniforms[g] + i) / counts[g] fall in each element's slice of the group's
    CDF, as `np.bincount(systematic(...))` gives each group alone."""
    sizes = np.diff(starts, append=probs.size)
    cdf = np.cumsum(probs)
    cdf -= np.repeat(cdf[starts] - probs[starts], sizes)  # restart at each group
    cdf[np.append(starts[1:], probs.size) - 1] = 1.0
    before = np.concatenate([[0.0], cdf[:-1]])
    before[starts] = 0.0
    m, u = np.repeat(counts, sizes), np.repeat(uniforms, sizes)

    def pointers_below(c: np.ndarray) -> np.ndarray:
        return np.clip(np.ceil(c * m - u), 0, m)

    return (pointers_below(cdf) - pointers_below(before)).astype(np.int64)


def standardised(values: np.ndarray) -> np.ndarray:
    """(v − mean) / std among siblings (zeros when they are all equal): makes search greed independent of scale."""
    spread = values.std()
    return np.zeros_like(values) if spread == 0 or not np.isfinite(spread) else (values - values.mean()) / spread


@dataclass
class _Item:
    """One selected iteration: the path from the root to the expanded node, and the nodes its rollout creates."""

    path: list[int]
    new_nodes: list[int]
    cost: int


@dataclass
class Timings:
    """Wall time per phase, in seconds."""

    transition: float = 0.0
    reward: float = 0.0
    bookkeeping: float = 0.0

    def as_dict(self) -> dict:
        return {"transition": self.transition, "reward": self.reward, "bookkeeping": self.bookkeeping}


class DTS:
    """Grow a denoising tree toward π*(x) ∝ p(x)·exp(λ·r(x)) (``mode="sample"``) or its modes (``mode="search"``).

    ``estimator`` picks how the tree is built and turned into samples. Under ``"frontier"`` (default) and
    ``"nested"`` values are log-mean-exp over all children and draws descend ∝ exp(λ·value); the tree's shape depends
    on node states only (h, the reward of a node's one-step prediction x̂_0, returned with the denoising step: no
    extra NFE), never on rewards below a node, so values are unbiased nested Monte-Carlo estimates, every leaf can be
    drawn and draws are consistent for π*. Both need ``transition(..., return_x0=True)``.

    - ``"frontier"`` (default): each iteration expands the level (x_T seeds included) furthest below its share of
      expansions, at the node of that level furthest below its share of them, shares ∝ m(n) =
      m(parent)·exp(κ·λ·Δh)/K(parent): SMC's resampling carried out over time, with the tree's reuse (rollouts start
      at every level). ``equal_share_levels`` k keeps the top k levels (the root's x_T seeds first) at the equal
      share 1/(levels + 1); ``level_cost_exponent`` β splits the rest ∝ cost^-β (a child at level ℓ costs ℓ NFE;
      0: equal counts, 1: equal NFE). ``branch_at_x_t`` (None: `branches_at_x_t`) says whether the x_T level is
      one of them: not with the paper's five levels, whose x_T level's share goes to the levels below; yes on a
      chain branching every T/10. ``early_lineages="fresh"`` then closes every level in the chain's first fifth
      (ℓ > 0.8·T; x_T and level 90 of a 100-step chain branching every 10) and hands its share to new x_T seeds:
      nodes there keep one child and every early lineage is a fresh chain (``"branch"``: they branch, as before
      round 11). The defaults, β = 0.75, k = None (the levels expanded in the chain's first fifth: the x_T seeds
      alone on five branch levels, three levels' shares, all the seeds', on ten), branch_at_x_t = None and
      early_lineages = "fresh", are the best measured (README: ten to forty seeds on the toy tasks, digits).
    - ``"nested"``: top-down; each node hands its visits to its children by a deterministic deficit pick with shares
      ∝ exp(κ·λ·h). Children compete only with their siblings, so a discovery cannot grow beyond its parent's visits.

    - ``"held-out"``: children alternate between *drawing* children (1st, 3rd, …) and *building* children (2nd,
      4th, …); selection is Boltzmann over building values, draws descend over drawing children.
    - ``"paper"``: Algorithm 1 as published: Boltzmann selection and drawing on the log-mean-exp over all children.

    ``guide_spread_cap`` (default 3 nats; None: off) tempers an over-confident guide in the frontier's masses: once
    a level has made its first GUIDE_SPREAD_WARMUP nodes, its h is scaled by s = min(1, cap / SD(λ·h)) there, and
    the tilts telescope (λ·(s·h(n) − s'·h(parent))). A log-density reward on x̂_0 at high noise (the 2D GMM) spreads
    λ·h over tens of nats and would pile a level's expansions onto one or two nodes; bounded rewards stay under the
    cap, and their trees are unchanged.

    The trust κ rises linearly from ``guide_trust`` when choosing among x_T seeds to 1 at the lowest branch level;
    its default is 1 for ``"frontier"`` and 0 for ``"nested"`` (on the paper's 2D GMM, x̂_0 at high noise sits between
    modes and full trust ruins the top-down tree).

    Search mode (DTS*) backs up the max (``search_backup="max"``) and descends from the root; with ``"frontier"`` or
    ``"nested"`` it allocates visits ∝
    exp(search_greed·(z(value) + z(guide))): the best leaf found below each child and the reward of its own x̂_0, each
    standardised among the siblings, so it is invariant to the reward's scale; with ``"paper"`` it selects by UCT on
    the soft value (``c_uct``). Draws return the best distinct leaves.

    ``widening`` (a `Widening`, or ``"default"`` / ``"paper"``: c = 2, α = 0.8 at every node) limits the children of
    the top-down rules (every estimator but sampling with ``"frontier"``, whose levels take equal expansion counts).

    Latents live on ``latent_device`` under ``latent_budget_bytes`` (None: no bound off the GPU, half the free memory
    on CUDA); past it the least recently used are evicted and replayed from their seeds when needed (counted in
    ``replayed_nfe``), all those a draw needs together, one batched call per level.
    """

    def __init__(
        self,
        prior: Prior,
        transition: Transition,
        reward: Reward,
        num_steps: int,
        lam: float = 1.0,
        mode: str = "sample",
        branch_levels: Sequence[int] | None = None,
        widening: Widening | str = "default",
        estimator: str = "frontier",
        c_uct: float = 1.0,
        guide_trust: float | None = None,
        search_greed: float = 4.0,
        search_backup: str = "max",
        level_cost_exponent: float = 0.75,
        equal_share_levels: int | None = None,
        branch_at_x_t: bool | None = None,
        early_lineages: str = "fresh",
        level_allocation: str = "fixed",
        guide_spread_cap: float | None = 3.0,
        batch_size: int = 16,
        seed: int = 0,
        device: torch.device | str | None = None,
        latent_device: torch.device | str | None = None,
        latent_budget_bytes: int | None = None,
    ):
        num_steps = check_integer("num_steps", num_steps, "the denoising steps of one rollout")
        if mode not in ("sample", "search"):
            raise ValueError(f"mode must be 'sample' (DTS) or 'search' (DTS*) (got {mode!r})")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} (got {estimator!r})")
        if isinstance(widening, str):
            if widening not in WIDENINGS:
                raise ValueError(f"widening must be a Widening or one of {tuple(WIDENINGS)} (got {widening!r})")
            widening = WIDENINGS[widening]
        if not isinstance(widening, Widening):
            raise TypeError(f"widening must be a Widening or a preset name (got {type(widening).__name__})")
        if not (0 <= c_uct < math.inf and 0 <= search_greed < math.inf):
            raise ValueError(f"c_uct and search_greed must be finite and >= 0 (got {c_uct}, {search_greed})")
        if not 0 <= level_cost_exponent <= 1:
            raise ValueError(f"level_cost_exponent must lie in [0, 1] (got {level_cost_exponent})")
        self.level_cost_exponent = level_cost_exponent
        if equal_share_levels is not None and (
            isinstance(equal_share_levels, bool)
            or not isinstance(equal_share_levels, numbers.Integral)
            or equal_share_levels < 0
        ):
            raise ValueError(
                f"equal_share_levels must be an integer >= 0, or None for the chain's first fifth "
                f"(got {equal_share_levels!r})"
            )
        if level_allocation not in LEVEL_ALLOCATIONS:
            raise ValueError(f"level_allocation must be one of {LEVEL_ALLOCATIONS} (got {level_allocation!r})")
        self.level_allocation = level_allocation
        if guide_spread_cap is not None and not 0 < guide_spread_cap < math.inf:
            raise ValueError(f"guide_spread_cap must be positive and finite, or None (got {guide_spread_cap})")
        self.guide_spread_cap = guide_spread_cap
        self.guide_scale: dict[int, float] = {}  # per node level, once measured: the frontier's tempering of h there
        self._guide_samples: dict[int, list[float]] = {}  # λ·h of each level's first nodes, until it is measured
        self._level_spread: dict[int, float] = {}  # per expanded level: spread of λ·V among siblings (neyman)
        self._batches = 0
        if search_backup not in ("max", "soft"):
            raise ValueError(f"search_backup must be 'max' or 'soft' (the soft value at lam) (got {search_backup!r})")
        batch_size = check_integer("batch_size", batch_size, "rollouts denoised together, e.g. 16")
        if latent_budget_bytes is not None and latent_budget_bytes <= 0:
            raise ValueError(f"latent_budget_bytes must be positive or None for no limit (got {latent_budget_bytes})")
        levels = default_branch_levels(num_steps) if branch_levels is None else [int(b) for b in branch_levels]
        bad = [b for b in levels if not 1 <= b <= num_steps]
        if bad:
            raise ValueError(
                f"branch levels must lie in 1..num_steps={num_steps} (got {bad}); "
                "level num_steps is x_T, level 1 the last denoising step"
            )
        self.prior, self.transition, self.reward = prior, transition, reward
        self.num_steps = num_steps
        self.lam = check_lambda(lam)
        self.mode, self.estimator = mode, estimator
        self.node_levels = sorted({num_steps, *levels, 0}, reverse=True)
        self._node_level_set = set(self.node_levels)
        self.widening, self.c_uct, self.search_greed, self.search_backup = widening, c_uct, search_greed, search_backup
        self._alpha = widening.exponents(self.node_levels[:-1])
        # search backs up the max (the best leaf below); sampling the soft value at λ
        self._backup_lam = math.inf if mode == "search" and search_backup == "max" else self.lam
        self._guided = estimator in ("nested", "frontier")
        self._frontier = estimator == "frontier" and mode == "sample"  # search descends from the root (below)
        if early_lineages not in EARLY_LINEAGES:
            raise ValueError(f"early_lineages must be one of {EARLY_LINEAGES} (got {early_lineages!r})")
        if branch_at_x_t is None:
            branch_at_x_t = branches_at_x_t(self.node_levels, num_steps)
        elif not isinstance(branch_at_x_t, bool):
            raise TypeError(f"branch_at_x_t must be True, False or None (the chain decides) (got {branch_at_x_t!r})")
        elif branch_at_x_t and early_lineages == "fresh":
            raise ValueError(
                "branch_at_x_t=True lets x_T nodes branch, which early_lineages='fresh' (the default) rules out: "
                "pass early_lineages='branch' with it"
            )
        open_levels = [num_steps + 1, *(lv for lv in self.node_levels[:-1] if lv != num_steps or branch_at_x_t)]
        if equal_share_levels is None:
            equal_share_levels = high_noise_levels(open_levels, num_steps)
        self.equal_share_levels = int(equal_share_levels)
        self.early_lineages = early_lineages
        shares = level_shares(open_levels, num_steps, level_cost_exponent, self.equal_share_levels)
        self._level_shares = fresh_early_shares(shares, num_steps) if early_lineages == "fresh" else shares
        self.branch_at_x_t = num_steps in self._level_shares  # whether x_T nodes get more than their first child
        if guide_trust is None:  # measured best per estimator (README): SMC-like frontier trusts x̂_0, top-down does not
            guide_trust = 1.0 if estimator == "frontier" else 0.0
        if not 0 <= guide_trust <= 1:
            raise ValueError(f"guide_trust must lie in [0, 1] (got {guide_trust})")
        self.guide_trust = guide_trust
        # trust in x̂_0 when choosing among a node's children: guide_trust at the root (choosing x_T), rising
        # linearly to 1 at the lowest branch level, where x̂_0 is nearly the outcome
        upper = self.node_levels[:-1]
        span = max(len(upper), 1)
        self._trust = {level: guide_trust + (1 - guide_trust) * (i + 1) / span for i, level in enumerate(upper)}
        self._trust[num_steps + 1] = guide_trust
        if self._guided and not accepts_keyword(transition, "return_x0"):
            raise TypeError(
                "the default DTS estimator scores each node's one-step prediction: transition(x, level, generators, "
                "return_x0=True) must return (x_prev, x0_hat); add that argument, or use estimator='held-out' or "
                "method 'dts-paper', which need no prediction"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.device = as_device(device, "device")
        self.tree = TreeArrays(root_level=num_steps + 1)
        self._masses = FrontierMasses(self.tree, self.node_levels[:-1]) if self._frontier else None
        self._draws = None  # the top-down rules that draw children ∝ exp(λ·key) keep an index of wide nodes
        if not self._guided and mode == "sample" and math.isfinite(self.lam):
            key = "value" if estimator == "paper" else "build_value"
            self._draws = ChildDraws(self.tree, self.lam, key, mean_for_missing=estimator == "held-out")
        self.store = LatentStore(
            as_device(latent_device, "latent_device") or self.device or torch.device("cpu"), latent_budget_bytes
        )
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._queue: list[_Item] = []
        self._nfe_target = 0
        self._draw_calls = 0
        self.nfe = 0
        self.replayed_nfe = 0
        self.reward_evals = 0
        self.guide_evals = 0
        self.iterations = 0
        self._nfe_by_level = np.zeros(num_steps + 2, dtype=np.int64)
        self._state_shape: tuple | None = None  # the prior's row shape, fixed by its first draw
        self._expansions_by_level: dict[int, int] = {}
        self.last_draw_distinct: int | None = None
        self.timings = Timings()
        self._best: tuple[int, float] = (-1, -math.inf)
        self._next_level = {hi: lo for hi, lo in zip(self.node_levels, self.node_levels[1:], strict=False)}
        self._next_level[num_steps + 1] = num_steps

    # ---------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------
    def run(self, nfe_budget: int, callback: Callable[[DTS], object] | None = None) -> DTS:
        """Spend at most `nfe_budget` more NFE growing the tree; a later call continues the same tree.

        Budgets accumulate, so `run(b)` twice builds the same tree as `run(2 * b)`. `callback(self)` runs after every
        batch; a truthy return stops early (the tree stays valid and can be continued) and drops the rest of the
        budget granted so far, so a later `run(b)` spends at most b more, not b plus what the stop left.
        """
        if not isinstance(nfe_budget, int | np.integer) or nfe_budget < 0:
            raise ValueError(f"nfe_budget must be a non-negative integer (got {nfe_budget!r})")
        self._nfe_target += int(nfe_budget)
        if self.iterations == 0 and not self._queue and self._nfe_target < self.num_steps:
            raise ValueError(
                f"nfe_budget={self._nfe_target} is below one rollout: the first sample costs num_steps="
                f"{self.num_steps} NFE; give at least that"
            )
        while True:
            start = time.perf_counter()
            if not self._queue:
                if self._masses is not None:
                    self._start_frontier_batch()
                    self._queue = [self._select_frontier() for _ in range(self.batch_size)]
                else:
                    self._queue = [self._select() for _ in range(self.batch_size)]
            affordable, spent = 0, 0
            for item in self._queue:
                if self.nfe + spent + item.cost > self._nfe_target:
                    break
                affordable, spent = affordable + 1, spent + item.cost
            batch, self._queue = self._queue[:affordable], self._queue[affordable:]
            self.timings.bookkeeping += time.perf_counter() - start
            if not batch:
                return self
            self._execute(batch)
            if callback is not None and callback(self):
                self._nfe_target = self.nfe
                return self

    def sample(self, n: int, return_rewards: bool = False):
        """`n` terminal states drawn from the tree with no model call (latent replays aside).

        Search mode returns the n best distinct leaves, best first, and warns when the tree has fewer (all its
        leaves are then repeated in rank order); `last_draw_distinct` (also in `stats()`) counts the distinct leaves
        of the last draw."""
        n = check_integer("n", n, "the number of samples to draw")
        if self.iterations == 0:
            raise RuntimeError("the tree is empty: call run(nfe_budget) before sample()")
        if self.mode == "search":
            leaves = self._best_first_leaves(n)
        else:
            rng = np.random.Generator(np.random.PCG64([self.seed, 1, self._draw_calls]))
            self._draw_calls += 1
            leaves = self._draw_leaves(n, rng)
        self.last_draw_distinct = len(set(leaves))
        x0 = self._latents(leaves)
        if return_rewards:
            return x0, torch.as_tensor(self.tree.value_np[leaves], dtype=torch.float32)
        return x0

    def best(self) -> tuple[torch.Tensor, float]:
        """The highest-reward terminal state found so far, shape [1, *shape], and its reward."""
        node, reward = self._best
        if node < 0:
            raise RuntimeError("the tree is empty: call run(nfe_budget) before best()")
        return self._latents([node]), reward

    def stats(self) -> dict:
        """Tree size, NFE accounting and diagnostics of reuse (NFE per leaf, NFE by expansion level), of the draw
        rule (leaves it can reach, the effective sample size (Σp)²/Σp² of its law over leaves, and per branch level
        the same ESS over the nodes its descents pass through: how many independent lineages the draws rest on
        there) and of the guide (each measured level's scale: under 1 where `guide_spread_cap` tempered it)."""
        tree = self.tree
        done = tree.done_np[: tree.size]
        levels = tree.level_np[: tree.size][done]
        leaves = int((levels == 0).sum())
        by_level = self._passage_probabilities() if self.mode == "sample" else None
        probs = by_level.get(0) if by_level is not None else None
        return {
            "nodes": int(done.sum()) - 1,
            "leaves": leaves,
            "depth": int(levels.max() - levels.min()),
            "root_children": int(done[tree.children(ROOT)].sum()),
            "iterations": self.iterations,
            "nfe": self.nfe,
            "nfe_per_leaf": self.nfe / leaves if leaves else None,
            "nfe_by_level": {int(lv): int(n) for lv, n in enumerate(self._nfe_by_level) if n},
            "replayed_nfe": self.replayed_nfe,
            "reward_evals": self.reward_evals,
            "guide_evals": self.guide_evals,
            "draw_eligible_leaves": int((probs > 0).sum()) if probs is not None else None,
            "draw_ess": effective_size(probs) if probs is not None and leaves else None,
            "draw_ess_by_level": {lv: effective_size(p) for lv, p in by_level.items() if lv > 0 and p.size}
            if by_level is not None and leaves
            else None,
            "last_draw_distinct": self.last_draw_distinct,
            "stored_latent_bytes": self.store.bytes,
            "best_reward": self._best[1],
            "root_value": float(tree.value_np[ROOT]),
            "guide_scale": dict(sorted(self.guide_scale.items(), reverse=True)),
            "timings": self.timings.as_dict(),
        }

    def _passage_probabilities(self) -> dict[int, np.ndarray]:
        """{node level: the probability that a draw's descent passes through each node of that level it may enter}
        (descent ∝ exp(λ·value) over eligible children); level 0 holds the finished leaves' draw probabilities.

        Node ids are created parent first, so one pass per level from the top fills them in."""
        tree = self.tree
        n = tree.size
        ids = np.arange(n)
        mask, weighed_by = self._drawable(ids[1:])  # every node but the root
        drawable, drawable_values = ids[1:][mask], weighed_by[mask]
        eligible = np.zeros(n, dtype=bool)
        eligible[drawable] = True
        values = np.full(n, -np.inf)
        values[drawable] = drawable_values
        parent = np.where(eligible, tree.parent_np[:n], 0)
        top = np.full(n, -np.inf)
        np.maximum.at(top, parent[eligible], values[eligible])
        with np.errstate(invalid="ignore"):
            weight = np.where(values == top[parent], 1.0, np.exp(self.lam * (values - top[parent])))
        weight = np.where(eligible, weight, 0.0)
        total = np.zeros(n)
        np.add.at(total, parent, weight)
        prob = np.zeros(n)
        prob[ROOT] = 1.0
        level = tree.level_np[:n]
        by_level = {}
        for lv in self.node_levels:
            rows = ids[eligible & (level == lv)]
            prob[rows] = prob[parent[rows]] * weight[rows] / total[parent[rows]]
            by_level[lv] = prob[rows]
        return by_level

    # ---------------------------------------------------------------------------------------------------------
    # selection and expansion
    # ---------------------------------------------------------------------------------------------------------
    def _start_frontier_batch(self) -> None:
        """Before a frontier batch: re-measure the level spreads every NEYMAN_EVERY batches (they move slowly)."""
        if self.level_allocation == "neyman" and self._batches % NEYMAN_EVERY == 0:
            tree = self.tree
            n = tree.size
            self._measure_level_spreads(np.flatnonzero(tree.done_np[:n]), tree.level_np[:n], tree.parent_np[:n])
        self._batches += 1

    def _log_tilts(self, nodes: Sequence[int]) -> list[float]:
        """The frontier's log tilt of each of `nodes` (not the root): κ·λ·(s(ℓ)·h(n) − s(ℓ')·h(parent)), h the x̂_0
        reward (0 at the root) and s the level's guide scale (`_measure_guide_spread`): the tilts telescope, so a
        node's mass is ∝ exp(λ·s·h(n)) over the splits above it, as an SMC particle's weight under tempered
        potentials. A loop, not array code: a rollout's few nodes are its hot path."""
        tree, out = self.tree, []

        def guide(node: int) -> float:
            value = 0.0 if node == ROOT else float(tree.guide_np[node])
            return 0.0 if math.isnan(value) else value * self.guide_scale.get(int(tree.level_np[node]), 1.0)

        for node in nodes:
            parent = int(tree.parent_np[node])
            change, trust = guide(node) - guide(parent), self._trust[int(tree.level_np[parent])]
            out.append(self.lam * trust * change if change and trust else 0.0)
        return out

    def _measure_guide_spread(self, nodes: list[int]) -> bool:
        """Temper a guide that over-claims: once a level has GUIDE_SPREAD_WARMUP nodes, fix its scale to
        s = min(1, cap / SD(λ·h)) over them. With an unbounded reward (a log-density) x̂_0 at high noise can spread
        λ·h over tens of nats, and untempered masses would then pile a level's expansions onto one or two nodes on
        a poor guess (the 2D GMM); a bounded reward's spread stays under the cap and its tree is unchanged. The
        scale reads only node states, never rewards below, so the estimates stay unbiased. True when a scale
        under 1 was set (the masses must then be retilted)."""
        if self.guide_spread_cap is None or len(self.guide_scale) == len(self.node_levels) - 1:
            return False  # off, or every level measured
        tree, tempered = self.tree, False
        for node in nodes:
            level, value = int(tree.level_np[node]), float(tree.guide_np[node])
            if level == 0 or level in self.guide_scale or math.isnan(value):
                continue
            seen = self._guide_samples.setdefault(level, [])
            seen.append(self.lam * value)
            if len(seen) >= GUIDE_SPREAD_WARMUP:
                spread = float(np.std(seen))
                self.guide_scale[level] = min(1.0, self.guide_spread_cap / spread) if spread > 0 else 1.0
                tempered |= self.guide_scale[level] < 1.0
                del self._guide_samples[level]
        return tempered

    def _measure_level_spreads(self, finished: np.ndarray, levels: np.ndarray, parent: np.ndarray) -> None:
        """Per expanded level, the pooled spread of λ·V among siblings (V: the soft value of each child's subtree,
        a leaf's reward): how much the outcome still depends on the choice made at that level."""
        values = self.tree.value_np[: self.tree.size]
        below = {up: down for up, down in zip(self.node_levels, self.node_levels[1:], strict=False)}
        below[self.num_steps + 1] = self.num_steps  # the root's children are the x_T seeds
        for up, down in below.items():
            rows = finished[levels[finished] == down]
            if rows.size:
                self._level_spread[up] = sibling_spread(self.lam * values[rows], parent[rows])

    def _neyman_shares(self, open_levels: list[int]) -> dict[int, float] | None:
        """Cochran's optimal allocation for strata with costs, n_ℓ ∝ S_ℓ / √c_ℓ: S_ℓ the spread of λ·V among the
        siblings a level's expansions made (what one more child there can change), c_ℓ its NFE. None (fixed shares)
        until every level has made enough children to measure it. The shares read values below each level as a
        whole, never one node's own, so the bias this adds to a node's child count is diluted across its level."""
        counts, spread = self._expansions_by_level, self._level_spread
        if any(counts.get(lv, 0) < NEYMAN_WARMUP or not math.isfinite(spread.get(lv, math.nan)) for lv in open_levels):
            return None
        floor = 0.1 * max(spread[lv] for lv in open_levels)  # a level whose children agree still gets some
        return {lv: max(spread[lv], floor, 1e-12) / math.sqrt(min(lv, self.num_steps)) for lv in open_levels}

    def _select_frontier(self) -> _Item:
        """Expand anywhere in the tree: the level (the root's x_T seeds included) with the fewest expansions so far,
        then the finished node of that level furthest below its share (∝ mass) of the level's expansions.

        How many children a node gets depends on its own state and on nodes above and beside it, never on its
        children, so every value stays an unbiased nested estimate; yet a node that reaches a good region multiplies
        across the whole level, as an SMC particle does, instead of competing only with its siblings."""
        tree = self.tree
        open_levels = [self.num_steps + 1, *(lv for lv in self._masses.open_levels() if lv in self._level_shares)]
        counts = self._expansions_by_level
        shares = self._neyman_shares(open_levels) if self.level_allocation == "neyman" else None
        shares = shares or self._level_shares
        level = min(open_levels, key=lambda lv: (counts.get(lv, 0) + 1) / shares[lv])
        counts[level] = counts.get(level, 0) + 1
        node = ROOT if level > self.num_steps else self._masses.pick(level, counts[level])
        path = [node]
        while path[-1] != ROOT:
            path.append(int(tree.parent_np[path[-1]]))
        path.reverse()
        tree.pending_np[path] += 1
        item = self._expand(path)
        if node != ROOT:
            self._masses.expanded_node(node)
        return item

    def _select(self) -> _Item:
        """Descend from the root until a node may widen (or has no finished child yet: all are in flight)."""
        tree = self.tree
        node, path = ROOT, [ROOT]
        while True:
            tree.pending_np[node] += 1
            level = int(tree.level_np[node])
            if level == 0:
                return _Item(path, [], 0)
            visits = int(tree.visits_np[node] + tree.pending_np[node] - 1)
            limit = widening_limit(max(visits, 1), self.widening.c, self._alpha[level])
            if tree.child_count_np[node] < limit or tree.finished_children(node) == 0:
                return self._expand(path)
            node = self._select_child(node)
            path.append(node)

    def _select_child(self, node: int) -> int:
        tree = self.tree
        if self._draws is not None:  # a Boltzmann draw: through the node's index when it is wide
            uniform = self._rng.random()
            child = self._draws.draw(node, uniform)
            if child is not None:
                return child
        kids = tree.children(node)
        kids = kids[tree.done_np[kids]]
        if self._guided:
            if self.mode == "search":
                # the best leaf below each child, and its own x̂_0 reward, each standardised among the siblings
                score = standardised(tree.value_np[kids]) + standardised(tree.guide_np[kids])
                shares = boltzmann(score, self.search_greed)
            else:
                shares = boltzmann(tree.guide_np[kids], self.lam * self._trust[int(tree.level_np[node])])
            return int(kids[deficit_pick(shares, tree.visits_np[node] + tree.pending_np[node],
                                         tree.visits_np[kids] + tree.pending_np[kids])])  # fmt: skip
        if self.mode == "search":
            visits = tree.visits_np[kids] + tree.pending_np[kids]
            parent_visits = tree.visits_np[node] + tree.pending_np[node]
            score = tree.value_np[kids] + self.c_uct * np.sqrt(np.log(parent_visits) / visits)
            return int(kids[np.argmax(score)])
        if self.estimator == "paper":
            probs = boltzmann(tree.value_np[kids], self.lam)
        else:
            probs = self._held_out_probs(tree.build_value_np[kids])
        if self._draws is None:
            return int(kids[self._rng.choice(kids.size, p=probs)])
        cdf = probs.cumsum()  # what rng.choice does with the uniform drawn above
        return int(kids[np.searchsorted(cdf / cdf[-1], uniform, side="right")])

    def _held_out_probs(self, build_values: np.ndarray) -> np.ndarray:
        """Boltzmann over building values; a child with none yet gets the mean weight of those that have one."""
        known = ~np.isnan(build_values)
        if not known.any():
            return np.full(build_values.size, 1.0 / build_values.size)
        weights = np.empty(build_values.size)
        weights[known] = boltzmann(build_values[known], self.lam)
        weights[~known] = weights[known].mean()
        return weights / weights.sum()

    def _expand(self, path: list[int]) -> _Item:
        """Create the rollout's nodes now (seeds drawn in selection order), compute their latents later."""
        tree = self.tree
        parent = path[-1]
        cost = min(int(tree.level_np[parent]), self.num_steps)
        new_nodes = []
        level = int(tree.level_np[parent])
        while level > 0:
            level = self._next_level[level]
            is_draw = parent == ROOT or tree.child_count_np[parent] % 2 == 0  # 1st, 3rd, … children draw
            seed = int(self._rng.integers(0, 2**63 - 1))
            parent = tree.add_node(parent, level, seed, is_draw_child=bool(is_draw))
            new_nodes.append(parent)
        return _Item(path, new_nodes, cost)

    # ---------------------------------------------------------------------------------------------------------
    # rollout, reward and backup
    # ---------------------------------------------------------------------------------------------------------
    def _execute(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        calls_before = self.timings.transition + self.timings.reward
        tree = self.tree
        rollouts = [item for item in batch if item.new_nodes]
        for item in rollouts:
            self._nfe_by_level[tree.level_np[item.path[-1]]] += item.cost
        if rollouts:
            x0, guided_nodes, x0_hat = self._rollout(rollouts)
            if guided_nodes:
                t0 = time.perf_counter()
                tree.guide_np[guided_nodes] = check_finite_rewards(self.reward(x0_hat), len(guided_nodes)).numpy()
                self.timings.reward += time.perf_counter() - t0
                self.guide_evals += len(guided_nodes)
            t0 = time.perf_counter()
            rewards = check_finite_rewards(self.reward(x0), len(rollouts))
            self.timings.reward += time.perf_counter() - t0
            self.reward_evals += len(rollouts)
            retilt = self._masses is not None and self._measure_guide_spread(guided_nodes)
            for item, r in zip(rollouts, rewards.tolist(), strict=True):
                leaf = item.new_nodes[-1]
                tree.set_leaf(leaf, r)
                tree.visits_np[item.new_nodes] = 1
                tree.backup(leaf, self._backup_lam)
                if self._masses is not None:
                    self._masses.add_rollout(item.path[-1], item.new_nodes, self._log_tilts(item.new_nodes))
                if self._draws is not None:
                    for node in (*item.new_nodes, *item.path[1:]):
                        self._draws.update(node)
                if r > self._best[1]:
                    self._best = (leaf, r)
            if retilt:  # every finished node's tilt under the new scales (the root's is unused)
                self._masses.retilt(np.array([0.0, *self._log_tilts(range(1, tree.size))]))
        for item in batch:
            tree.pending_np[item.path] -= 1
            tree.visits_np[item.path] += 1
        self.iterations += len(batch)
        in_calls = self.timings.transition + self.timings.reward - calls_before
        self.timings.bookkeeping += time.perf_counter() - start - in_calls

    def _rollout(self, items: list[_Item]) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """Denoise every item from its expansion point to x_0, one batched transition call per level.

        Returns x_0 per item and, for the estimator guided by x̂_0, the new nodes whose prediction the steps taken
        from them produced, with those predictions."""
        tree = self.tree
        n = len(items)
        from_prior = [i for i, item in enumerate(items) if item.path[-1] == ROOT]
        from_node = [i for i, item in enumerate(items) if item.path[-1] != ROOT]
        parts, order = [], []
        if from_prior:
            first = [items[i].new_nodes[0] for i in from_prior]
            t0 = time.perf_counter()
            drawn = call_prior(self.prior, len(first), row_generators(tree.seed_np[first]), self._state_shape)
            self._state_shape = tuple(drawn.shape[1:])
            parts.append(drawn)
            self.timings.transition += time.perf_counter() - t0
            order += from_prior
        if from_node:
            parts.append(self._latents([items[i].path[-1] for i in from_node]))
            order += from_node
        x = torch.cat([p.to(self._compute_device(p)) for p in parts])[np.argsort(order)]
        # per-row cursor into new_nodes: the next node to reach, and the generator of the edge into it
        cursor = [0 if item.path[-1] != ROOT else 1 for item in items]
        level = [int(tree.level_np[item.path[-1]]) for item in items]
        for i in from_prior:
            level[i] = self.num_steps
        self._store([items[i].new_nodes[0] for i in from_prior], x[from_prior] if from_prior else None)
        gens = [self._edge_generator(items[i], cursor[i]) for i in range(n)]
        guided_nodes, x0_hat = [], []
        for current in range(max(level), 0, -1):
            active = [i for i in range(n) if level[i] == current]
            if not active:
                continue
            index = torch.as_tensor(active, device=x.device)
            need: list[int] = []
            if self._guided and current in self._node_level_set:
                # rows at a node level sit on a node; those without a guide yet get one from this step's prediction
                at = [items[i].new_nodes[cursor[i] - 1] if cursor[i] > 0 else items[i].path[-1] for i in active]
                need = [k for k, node in enumerate(at) if math.isnan(tree.guide_np[node])]
            t0 = time.perf_counter()
            out = call_transition(self.transition, x[index], current, [gens[i] for i in active], return_x0=bool(need))
            self.timings.transition += time.perf_counter() - t0
            if need:
                out, predicted = out
                guided_nodes += [at[k] for k in need]
                x0_hat.append(predicted[torch.as_tensor(need, device=predicted.device)])
            x[index] = out.to(x.dtype)
            self.nfe += len(active)
            reached, rows = [], []
            for i in active:
                level[i] -= 1
                node = items[i].new_nodes[cursor[i]]
                if tree.level_np[node] == level[i]:
                    reached.append(node)
                    rows.append(i)
                    cursor[i] += 1
                    gens[i] = self._edge_generator(items[i], cursor[i])
            if reached:
                self._store(reached, x[torch.as_tensor(rows, device=x.device)])
        return x, guided_nodes, torch.cat(x0_hat) if x0_hat else None

    def _edge_generator(self, item: _Item, cursor: int) -> torch.Generator | None:
        if cursor >= len(item.new_nodes):
            return None
        return row_generators([self.tree.seed_np[item.new_nodes[cursor]]])[0]

    def _compute_device(self, like: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else like.device

    @property
    def _home(self) -> torch.device:
        """Where gathered latents are returned: the compute device, else the store's."""
        return self.device if self.device is not None else self.store.device

    def _store(self, nodes: list[int], latents: torch.Tensor | None) -> None:
        if nodes:
            self.store.put(self.tree, nodes, latents)

    # ---------------------------------------------------------------------------------------------------------
    # latents: gather, replay evicted ones from stored seeds
    # ---------------------------------------------------------------------------------------------------------
    def _latents(self, nodes: list[int]) -> torch.Tensor:
        """The latents of `nodes` (repeats allowed), in order: stored ones in one gather, evicted ones replayed
        together (`_replay`), then stored."""
        tree = self.tree
        unique = list(dict.fromkeys(int(node) for node in nodes))
        slots = tree.slot_np[unique]
        stored = [i for i, slot in enumerate(slots) if slot != NO_SLOT]
        missing = [i for i, slot in enumerate(slots) if slot == NO_SLOT]
        parts, order = [], stored + missing
        if stored:
            parts.append(self.store.get(slots[stored].tolist()).to(self._home))
        if missing:
            replayed = self._replay([unique[i] for i in missing])
            self._store([unique[i] for i in missing], replayed)
            parts.append(replayed)
        x = torch.cat(parts)[torch.as_tensor(np.argsort(order), device=self._home)]
        if len(unique) == len(nodes):
            return x
        index = {node: i for i, node in enumerate(unique)}
        return x[torch.as_tensor([index[int(node)] for node in nodes], device=self._home)]

    def _replay(self, targets: list[int]) -> torch.Tensor:
        """Recompute evicted latents from their nearest stored ancestor (or their x_T seed) with the seeds of the
        edges below it, all targets together: one transition call per level for every row at that level (in chunks
        of `batch_size`), a shared evicted ancestor replayed once. Each row draws only from its own edge's
        generator, as in the rollout that made it, so the latents are the same bit for bit."""
        tree = self.tree
        waiting: dict[int, list[int]] = {}  # a replayed node -> its children to replay from it
        sources: list[int] = []  # stored ancestors and evicted x_T nodes the replay starts from
        seen = set(targets)
        for node in targets:
            while tree.slot_np[node] == NO_SLOT and tree.parent_np[node] != ROOT:
                parent = int(tree.parent_np[node])
                waiting.setdefault(parent, []).append(node)
                if parent in seen:
                    break
                seen.add(parent)
                node = parent
            else:
                sources.append(node)
        latent = dict(zip(sources, self._replay_sources(sources), strict=True))

        def edges_below(parent: int, x: torch.Tensor) -> list[tuple]:
            """Rows (node, level, latent, generator) stepping from `parent`'s latent to each child waiting on it."""
            level = int(tree.level_np[parent])
            return [(child, level, x, row_generators([tree.seed_np[child]])[0]) for child in waiting.get(parent, [])]

        rows = [row for top in sources for row in edges_below(top, latent[top])]
        for current in range(self.num_steps, 0, -1):
            active = [row for row in rows if row[1] == current]
            rows = [row for row in rows if row[1] != current]
            for start in range(0, len(active), self.batch_size):
                chunk = active[start : start + self.batch_size]
                x = torch.cat([row[2] for row in chunk])
                out = call_transition(self.transition, x, current, [row[3] for row in chunk])
                self.replayed_nfe += len(chunk)
                for (node, _, _, generator), y in zip(chunk, out.split(1), strict=True):
                    if tree.level_np[node] < current - 1:  # the edge goes on: same row, same generator
                        rows.append((node, current - 1, y, generator))
                    else:
                        latent[node] = y
                        rows += edges_below(node, y)
        return torch.cat([latent[node] for node in targets]).to(self._home)

    def _replay_sources(self, nodes: list[int]) -> list[torch.Tensor]:
        """The latents a replay starts from, one row each: stored ones in one gather, x_T nodes redrawn from their
        seeds in one prior call (no NFE)."""
        tree = self.tree
        stored = [node for node in nodes if tree.slot_np[node] != NO_SLOT]
        drawn = [node for node in nodes if tree.slot_np[node] == NO_SLOT]
        rows: dict[int, torch.Tensor] = {}
        if stored:
            x = self.store.get(tree.slot_np[stored].tolist())
            rows |= dict(zip(stored, x.to(self._compute_device(x)).split(1), strict=True))
        if drawn:
            x = call_prior(self.prior, len(drawn), row_generators(tree.seed_np[drawn]), self._state_shape)
            rows |= dict(zip(drawn, x.to(self._compute_device(x)).split(1), strict=True))
        return [rows[node] for node in nodes]

    # ---------------------------------------------------------------------------------------------------------
    # drawing from the finished tree
    # ---------------------------------------------------------------------------------------------------------
    def _drawable(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The draw rule: which of `nodes` a descent may enter (a mask), and the values it weighs them by
        (exp(λ·value))."""
        tree = self.tree
        if self.estimator == "held-out":
            mask = tree.done_np[nodes] & tree.is_draw_child_np[nodes] & tree.draw_complete_np[nodes]
            return mask, tree.draw_value_np[nodes]
        return tree.done_np[nodes], tree.value_np[nodes]

    def _draw_leaves(self, n: int, rng: np.random.Generator) -> list[int]:
        """`n` leaves by Boltzmann descent, stratified: a node holding m draws hands them to its children by systematic
        resampling, so a child of probability p gets ⌊m·p⌋ or ⌈m·p⌉ of them. Each draw keeps the law of a single
        descent; the set of n has less spread than n independent descents (fewer repeats of the same leaf). One
        vectorised step per level (nodes exist only at node levels, so a step's nodes share one level)."""
        tree = self.tree
        nodes, counts = np.array([ROOT]), np.array([n])
        while tree.level_np[nodes[0]] > 0:
            kids, owner = tree.children_of(nodes)
            drawable, values = self._drawable(kids)
            kids, owner, values = kids[drawable], owner[drawable], values[drawable]
            starts = np.flatnonzero(np.diff(owner, prepend=-1))  # each node's run of children
            probs = grouped_boltzmann(values, starts, self.lam)
            shares = grouped_systematic(probs, starts, counts[owner[starts]], rng.random(starts.size))
            nodes, counts = kids[shares > 0], shares[shares > 0]
        leaves = np.repeat(nodes, counts)
        rng.shuffle(leaves)  # the order carries no information
        return leaves.tolist()

    def _best_first_leaves(self, n: int) -> list[int]:
        """Leaves in best-first order by value (DTS*): the first is the argmax-descent leaf, since a soft mean never
        exceeds its largest child; the next are the highest-valued leaves and subtrees left, not the argmax leaf's
        siblings whatever their value."""
        tree = self.tree
        leaves: list[int] = []
        frontier = [(-float(tree.value_np[ROOT]), ROOT)]
        while frontier and len(leaves) < n:
            _, node = heapq.heappop(frontier)
            if tree.level_np[node] == 0:
                leaves.append(node)
                continue
            kids = tree.children(node)
            for kid in kids[tree.done_np[kids]].tolist():
                heapq.heappush(frontier, (-float(tree.value_np[kid]), kid))
        if len(leaves) < n:
            warnings.warn(
                f"search asked for {n} samples but the tree has only {len(leaves)} leaves; every leaf is returned, "
                f"repeated in rank order to fill the request. Give a larger budget (about {n * self.num_steps} NFE or "
                f"more) for {n} distinct samples",
                stacklevel=3,
            )
        # round-robin, not the best one n - k times: the returned set stays representative of the tree, so its mean
        # reward is the leaves' own and can only rise as later budgets add better leaves
        return [leaves[i % len(leaves)] for i in range(n)]
