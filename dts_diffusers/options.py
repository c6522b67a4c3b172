"""The options of a tree search that travel together, with one set of defaults for every front end.

The pipelines, the `dts` command and the ComfyUI nodes each build one `TreeOptions` (checked when it is built, so a
bad value fails before any model loads or runs) and hand it on; `sampler_options` turns it into the keywords of the
engine's samplers, which stay free of this module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import WIDENINGS, check_integer, default_branch_levels
from .methods import METHODS, sampler_option_names, searches
from .tree import Widening

MODES = ("sample", "search")

# sampler options a TreeOptions field (or the caller: seed, device, the forward process) sets; not method_options
SET_BY_FIELDS = {
    "lam": "lam=",
    "mode": "mode=",
    "branch_levels": "branch_levels= or branch_every=",
    "widening": "widening=",
    "c_uct": "c_uct=",
    "batch_size": "rollout_batch_size=",
    "latent_device": "latent_cache_device=",
    "latent_budget_bytes": "latent_cache_bytes=",
    "seed": "generator= (the pipelines) or the seed (the nodes)",
    "device": "the pipeline's device",
    "renoise": "the scheduler (the pipeline passes its forward process)",
}


def check_real(name: str, value, fix: str, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number (never a bool) >= minimum, or > minimum when `strict`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (got {type(value).__name__} {value!r}); {fix}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound} (got {value}); {fix}")
    return value


def check_device(name: str, device) -> torch.device:
    """A device this machine has: torch only finds out when it first allocates there, mid-search."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:
        raise ValueError(f"{name}={device!r} is not a usable device here ({error}); e.g. 'cpu' or 'cuda'") from None
    return device


def check_method_options(method: str, method_options) -> dict:
    """The sampler options of `method` that no TreeOptions field sets, checked by name."""
    if method_options is None:
        return {}
    if not isinstance(method_options, Mapping):
        raise TypeError(f"method_options must be a dict of sampler options (got {type(method_options).__name__})")
    for name in method_options:
        if name in SET_BY_FIELDS:
            raise ValueError(f"method_options[{name!r}] is set outside method_options: use {SET_BY_FIELDS[name]}")
    accepted = [name for name in sampler_option_names(method) if name not in SET_BY_FIELDS]
    unknown = sorted(set(method_options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no option {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return dict(method_options)


def widening_option(widening) -> dict:
    """The `widening=` sampler option: "default" passes nothing, so each method keeps its own widening (the engine's
    default for "dts" / "dts*", the paper's for "dts-paper" / "dts*-paper"); a `Widening` or "paper" is passed on."""
    if isinstance(widening, str) and widening not in WIDENINGS:
        raise ValueError(f"widening must be a Widening or one of {', '.join(WIDENINGS)} (got {widening!r})")
    if not isinstance(widening, str | Widening):
        raise TypeError(f"widening must be a Widening or one of {', '.join(WIDENINGS)} (got {widening!r})")
    return {} if widening == "default" else {"widening": widening}


@dataclass(frozen=True)
class TreeOptions:
    """How one tree (or baseline) is grown: the same object drives the pipelines, the `dts` command and the nodes.

    lam: finite λ ≥ 0 of the target p·exp(λ·r); 0 samples the base model. The greedy limit λ = ∞ is not a value of
        lam: use mode="search" (DTS*), which returns the best samples found.
    mode: "sample" (DTS, draws ∝ p·exp(λr)) or "search" (DTS*, the best found).
    method: "dts" (the tree), "dts*" (always the search), "dts-paper" / "dts*-paper" (the paper's Algorithm 1 /
        DTS*), or a baseline of `dts_diffusers.methods.METHODS` under the same NFE budget ("dfs" is depth-first search
        with backtracking).
    method_options: further options of the method's sampler, e.g. `{"max_backtracks": 2}` for "dfs" or
        `{"local_search_steps": 2, "local_search_step_size": 0.05}` for "bfs"/"dfs"; see
        `dts_diffusers.methods.sampler_option_names(method)`.
    branch_every / branch_levels: where the tree branches (default: the paper's five levels, every num_steps / 5).
    widening: progressive widening per level, a `Widening` or "default" / "paper" (the paper's uniform c = 2,
        α = 0.8); "default" keeps the method's own ("paper" for the "-paper" methods).
    c_uct: exploration constant of search mode.
    rollout_batch_size: rollouts denoised together (a UNet batch is twice this with classifier-free guidance).
    latent_cache_bytes / latent_cache_device: bound and place the tree's stored latents; evicted ones are replayed
        from their seeds (None: no bound on the CPU, half the free memory on a CUDA latent device).
    """

    lam: float = 1.0
    mode: str = "sample"
    method: str = "dts"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    branch_every: int | None = None
    branch_levels: tuple[int, ...] | None = None
    widening: Widening | str = "default"
    c_uct: float = 1.0
    rollout_batch_size: int = 16
    latent_cache_bytes: int | None = None
    latent_cache_device: str | torch.device | None = None

    def __post_init__(self):
        fix_lam = (
            "lam=0 samples the base model, larger lam follows the reward more closely; for the greedy limit "
            "(lam=inf) use mode='search' (DTS*), which returns the best samples found"
        )
        self._set("lam", check_real("lam", self.lam, fix_lam, minimum=0))
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sample' (DTS, draws ∝ p·exp(λr)) or 'search' (DTS*) (got {self.mode!r})")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self._set("method_options", check_method_options(self.method, self.method_options))
        if self.branch_every is not None:
            every = check_integer("branch_every", self.branch_every, "e.g. branch_every=10 branches every 10 steps")
            self._set("branch_every", every)
        if self.branch_levels is not None:
            given = self.branch_levels
            if isinstance(given, str | Mapping) or not isinstance(given, Iterable):
                raise TypeError(f"branch_levels must be a list of levels, e.g. [50, 40, 30] (got {given!r})")
            levels = [check_integer("branch_levels[]", level, "levels from num_steps down to 1") for level in given]
            self._set("branch_levels", tuple(levels))
        widening_option(self.widening)
        self._set("c_uct", check_real("c_uct", self.c_uct, "the exploration constant of search mode, >= 0", minimum=0))
        batch = check_integer("rollout_batch_size", self.rollout_batch_size, "rollouts denoised together, e.g. 16")
        self._set("rollout_batch_size", batch)
        if self.latent_cache_bytes is not None:
            bound = check_integer("latent_cache_bytes", self.latent_cache_bytes, "a bound in bytes, or None")
            self._set("latent_cache_bytes", bound)
        if self.latent_cache_device is not None:
            self._set("latent_cache_device", check_device("latent_cache_device", self.latent_cache_device))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # the checked, normalised value (numpy ints → int, lists → tuples)

    @classmethod
    def build(cls, options: TreeOptions | None = None, **changes) -> TreeOptions:
        """`options` (default: `TreeOptions()`) with the fields named in `changes` replaced: what a pipeline call
        does with its `tree_options=` and its keywords `lam=`, `mode=`, …"""
        if options is not None and not isinstance(options, TreeOptions):
            raise TypeError(f"tree_options must be a TreeOptions (got {type(options).__name__})")
        return (options or cls()).replace(**changes)

    @classmethod
    def split_keywords(cls, keywords: dict) -> tuple[dict, dict]:
        """`keywords` split into those naming a field and the others."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in keywords.items() if k in names}, {k: v for k, v in keywords.items() if k not in names}

    def replace(self, **changes) -> TreeOptions:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    @property
    def searches(self) -> bool:
        """Whether this runs a search (best found) rather than sampling π*."""
        return searches(self.method, self.mode)

    def levels(self, num_steps: int) -> list[int]:
        """Branch levels: explicit, every `branch_every` steps from the top (50, 40, …, 10), or the paper's five."""
        if self.branch_levels is not None:
            return list(self.branch_levels)
        if self.branch_every is None:
            return default_branch_levels(num_steps)
        return list(range(num_steps, 0, -self.branch_every))

    def sampler_options(self, num_steps: int) -> dict:
        """The keywords of `dts_diffusers.methods.build_sampler` these options set."""
        return {
            "lam": self.lam,
            "mode": self.mode,
            "branch_levels": self.levels(num_steps),
            **widening_option(self.widening),
            "c_uct": self.c_uct,
            "batch_size": self.rollout_batch_size,
            "latent_device": self.latent_cache_device,
            "latent_budget_bytes": self.latent_cache_bytes,
            **self.method_options,
        }
