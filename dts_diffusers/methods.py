"""One entry point for every method under the same NFE accounting: DTS, DTS*, and the particle baselines."""

from __future__ import annotations

from collections.abc import Callable

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
METHODS = ("dts", "dts*", *PARTICLE_PRESETS)


def build_sampler(method: str, prior: Callable, transition: Callable, reward: Callable, num_steps: int, **options):
    """Build a sampler with `run(nfe_budget)`, `sample(n)`, `best()`, `nfe` and `stats()`.

    `"dts"` and `"dts*"` are the tree (sample / search mode); the rest are particle presets whose axes can be
    overridden by keyword (`temperature=`, `scoring=`, `resampling=`, `ess_threshold=`, `num_particles=`).
    Options a method does not use are dropped, so one set of arguments can drive every method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("dts", "dts*"):
        if method == "dts*":
            options["mode"] = "search"
        keep = DTS.__init__.__code__.co_varnames
        return DTS(prior, transition, reward, num_steps, **{k: v for k, v in options.items() if k in keep})
    if "branch_levels" in options and "eval_levels" not in PARTICLE_PRESETS[method]:  # best-of-N never evaluates
        options.setdefault("eval_levels", options["branch_levels"])
    merged = {**PARTICLE_PRESETS[method], **options}
    keep = ParticleSearch.__init__.__code__.co_varnames
    return ParticleSearch(prior, transition, reward, num_steps, **{k: v for k, v in merged.items() if k in keep})
