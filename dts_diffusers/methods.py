"""One entry point for every method under the same NFE accounting: DTS, DTS*, the particle baselines and DFS."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .dfs import DepthFirstSearch
from .engine import DTS
from .particles import ParticleSearch

# Presets of the particle family, named after the methods they reproduce (classical-search paper, ALGORITHM.md).
PARTICLE_PRESETS: dict[str, dict] = {
    "best-of-n": {"eval_levels": []},
    "smc": {"temperature": "constant", "scoring": "difference", "resampling": "systematic", "ess_threshold": 0.5},
    "fk": {"temperature": "constant", "scoring": "max", "resampling": "multinomial", "ess_threshold": 1.0},
    "svdd": {"temperature": "inf", "scoring": "current", "resampling": "multinomial", "ess_threshold": 1.0},
    "das": {"temperature": "increase", "scoring": "difference", "resampling": "ssp", "ess_threshold": 1.0},
    "bfs": {"temperature": "increase", "scoring": "max", "resampling": "ssp", "ess_threshold": 1.0},
}
# The tree's presets: the measured defaults, and the paper's Algorithm 1 / DTS* (uniform widening c = 2, α = 0.8,
# Boltzmann or UCT selection on rollout values, soft backup) to reproduce its results side by side.
TREE_PRESETS: dict[str, dict] = {
    "dts": {},
    "dts*": {"mode": "search"},
    "dts-paper": {"estimator": "paper", "widening": "paper"},
    "dts*-paper": {"mode": "search", "estimator": "paper", "widening": "paper", "search_backup": "soft"},
}
METHODS = (*TREE_PRESETS, *PARTICLE_PRESETS, "dfs")


def searches(method: str, mode: str) -> bool:
    """Whether `method` run with `mode` is a search: mode="search", or a tree preset that always is ("dts*")."""
    return mode == "search" or TREE_PRESETS.get(method, {}).get("mode") == "search"


def sampler_class(method: str) -> type:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in TREE_PRESETS:
        return DTS
    return DepthFirstSearch if method == "dfs" else ParticleSearch


def sampler_option_names(method: str) -> list[str]:
    """The keyword options `method`'s sampler takes, besides prior, transition, reward and num_steps."""
    parameters = list(inspect.signature(sampler_class(method).__init__).parameters)
    return parameters[5:]  # self, prior, transition, reward, num_steps


def build_sampler_options(method: str) -> list[str]:
    """The keywords `build_sampler` passes on for `method`: its sampler's own, and `branch_levels` (every method's
    levels: the tree's branch levels, the particle methods' and DFS's evaluation levels)."""
    return ["branch_levels", *(name for name in sampler_option_names(method) if name != "branch_levels")]


def build_sampler(method: str, prior: Callable, transition: Callable, reward: Callable, num_steps: int, **options):
    """Build a sampler with `run(nfe_budget)`, `sample(n)`, `best()`, `nfe` and `stats()`.

    `"dts"` and `"dts*"` are the tree (sample / search mode), `"dts-paper"` and `"dts*-paper"` the paper's own
    rules; `"dfs"` is depth-first search with backtracking (needs
    `renoise=`); the rest are particle presets whose axes can be overridden by keyword (`temperature=`, `scoring=`,
    `resampling=`, `ess_threshold=`, `num_particles=`). The particle methods and DFS take local search options
    (`local_search_steps=`, `local_search_step_size=`, with `renoise=`). `branch_levels=` sets the evaluation levels
    of the particle methods and DFS. Options a method does not use are dropped, so one set of arguments can drive
    every method; a name that no method takes (a typo) raises instead of silently running the default.
    """
    cls = sampler_class(method)
    unknown = sorted(set(options) - {name for m in METHODS for name in build_sampler_options(m)})
    if unknown:
        raise TypeError(
            f"build_sampler got unknown option(s) {', '.join(unknown)}; {method!r} takes "
            f"{', '.join(build_sampler_options(method))}"
        )
    if "mode" in TREE_PRESETS.get(method, {}):
        options = {**options, "mode": TREE_PRESETS[method]["mode"]}  # "dts*" searches whatever mode= says
    if "branch_levels" in options and cls is not DTS and "eval_levels" not in PARTICLE_PRESETS.get(method, {}):
        options.setdefault("eval_levels", options["branch_levels"])  # best-of-N never evaluates
    merged = {**PARTICLE_PRESETS.get(method, {}), **TREE_PRESETS.get(method, {}), **options}
    keep = sampler_option_names(method)
    return cls(prior, transition, reward, num_steps, **{k: v for k, v in merged.items() if k in keep})
