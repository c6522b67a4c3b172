"""Exact toy chains: distance to π* for the samplers, reward found for the searchers, all at equal NFE.

- sampling (distance to π*: Wasserstein-1 in 1D, MMD otherwise; mass on the rare high-reward mode where the task
  has one), for DTS (the default), DTS (paper: Algorithm 1's preset), best-of-N with importance resampling, SMC and
  FK-steering:
  - bimodal-1d: an exact 20-step mixture chain with a 4% high-reward mode (the known finding of issue 2);
  - rare-mode-8d: a 0.5% high-reward mode in 8D, chosen at high noise; 20 steps;
  - long-chain-100: 100 steps branching every 10 levels, a 2% high-reward centre mode chosen at high noise, up to
    10^6 NFE;
  - gmm-2d and checkerboard-2d: the paper's 2D tasks (100 steps, branch every 20), up to 10^6 NFE.
  Per task: the NFE at which each sampler's median first reaches 2× the noise floor, the best baseline's distance at
  the largest budget and fixed distances, with DTS's NFE ratio to the best baseline.
- search, gmm-2d and rare-mode-8d: DTS*, DTS* (paper), best-of-N, BFS (increasing temperature, max scoring, SSP),
  SVDD, DFS with backtracking, BFS with local search and DAS (without gradients): the mean reward of the 100 best
  samples each returns and the best reward found; the NFE at which DTS* first reaches best-of-N's best reward at the
  largest budget, and best-of-N's budget over it.
- diagnostics per row: the distinct samples among the draws (every method), and for the tree its NFE per leaf, the
  draw rule's effective sample size over leaves and the distinct leaves of a draw (`stats()`, None elsewhere).
- engine cost: bookkeeping time per iteration (selection, expansion, backup) of the default DTS near 10^4, 10^5 and
  10^6 nodes (`--engine-nodes`), and the share of wall time spent outside `transition` and `reward` on gmm-2d.

Draws in sample mode are stratified for every method (systematic shares), so the comparison is between estimators.
Within a task every method runs once per seed before the next seed starts, so a slow period of the machine spreads
over the methods. MMD uses Gaussian kernels of bandwidths (0.5, 1, 2)·√(d/2): the 2D tasks keep (0.5, 1, 2), the 8D
task gets (1, 2, 4), matched to its per-coordinate spread.

Writes benchmarks/results/toy.{json,md,png} (`--name` changes the stem), rewritten after every task so a killed run
keeps the finished ones. `--tasks` runs a subset; `--quick` runs tiny budgets (a smoke test, not results);
`--from-json A.json B.json` merges the tasks of saved reports and rebuilds the tables and plot, running nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from engine_cost import bookkeeping_by_size
from ranking import nfe_to_reach, parse_sampler, ranking_table, write_atomically
from scipy.stats import wasserstein_distance

from dts_diffusers.methods import build_sampler
from dts_diffusers.toy import ToyTask, bimodal_1d, checkerboard_2d, gmm_2d, long_chain, rare_mode_8d

RESULTS = Path(__file__).parent / "results"
SAMPLERS = {  # label -> (method, options)
    "DTS": ("dts", {}),
    "DTS (paper)": ("dts-paper", {}),
    "best-of-N": ("best-of-n", {}),
    "SMC": ("smc", {}),
    "FK": ("fk", {}),
}
SEARCHERS = {
    "DTS*": ("dts*", {}),
    "DTS* (paper)": ("dts*-paper", {}),
    "best-of-N": ("best-of-n", {"mode": "search"}),
    "BFS": ("bfs", {"mode": "search"}),
    "SVDD": ("svdd", {"mode": "search"}),
    "DFS": ("dfs", {"mode": "search"}),
    "BFS + local search": ("bfs", {"mode": "search", "local_search_steps": 1, "local_search_step_size": 0.01}),
    "DAS": ("das", {"mode": "search"}),
}
BASELINES = ("best-of-N", "SMC", "FK")
TRACED = ("DTS*", "DTS* (paper)")  # searchers whose best reward is also recorded between budgets
BUDGETS = [1000, 3000, 10_000, 30_000, 100_000]
PAPER_BUDGETS = [*BUDGETS, 300_000, 1_000_000]
QUICK_BUDGETS = [400, 1000, 2000]
SAMPLING_TASKS = {  # name -> (task factory, budgets)
    "bimodal-1d": (bimodal_1d, BUDGETS),
    "rare-mode-8d": (rare_mode_8d, BUDGETS),
    "long-chain-100": (long_chain, PAPER_BUDGETS),
    "gmm-2d": (gmm_2d, PAPER_BUDGETS),
    "checkerboard-2d": (checkerboard_2d, PAPER_BUDGETS),
}
SEARCH_TASKS = {"search-gmm-2d": (gmm_2d, BUDGETS), "search-rare-mode-8d": (rare_mode_8d, BUDGETS)}
ENGINE_COST = "engine-cost"
ALL_TASKS = [*SAMPLING_TASKS, *SEARCH_TASKS, ENGINE_COST]
ENGINE_NODES = (10_000, 100_000, 1_000_000)
FIXED_TARGETS = {"w1": (0.3, 0.15, 0.1), "mmd": (0.3, 0.15, 0.1)}  # distances every sampler is asked to reach
ANYTIME = {"dts", "dts*", "dts-paper", "dts*-paper", "best-of-n"}  # a later run(b) continues the same sampler exactly
TOP = 100  # search: mean reward of the best TOP samples returned
# recorded name -> the tree's stats() key
DIAGNOSTICS = {
    "nfe_per_leaf": "nfe_per_leaf",
    "draw_ess": "draw_ess",
    "draw_distinct_leaves": "last_draw_distinct",
    "draw_eligible_leaves": "draw_eligible_leaves",
}
PROFILES = {"nfe_by_level": "nfe_by_level", "lineage_ess_by_level": "draw_ess_by_level"}  # per-level, the tree's
PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:green",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
    "gold",
    "navy",
)
COLORS = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys([*SAMPLERS, *SEARCHERS]))}


def mmd(x: np.ndarray, y: np.ndarray, bandwidths=(0.5, 1.0, 2.0)) -> float:
    """Biased MMD with a sum of Gaussian kernels (positive, so comparable with its noise floor)."""
    xy = np.concatenate([x, y]).astype(np.float64).reshape(len(x) + len(y), -1)
    norms = (xy**2).sum(-1)
    sq = np.maximum(norms[:, None] + norms[None, :] - 2 * xy @ xy.T, 0.0)
    k = sum(np.exp(-sq / (2 * b**2)) for b in bandwidths)
    n = len(x)
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(math.sqrt(max(value, 0.0)))


def distance_key(task: ToyTask) -> str:
    return "w1" if task.chain.dim == 1 else "mmd"


def distances(task: ToyTask, drawn: torch.Tensor, reference: torch.Tensor) -> dict:
    if task.chain.dim == 1:
        out = {"w1": float(wasserstein_distance(drawn.flatten().numpy(), reference.flatten().numpy()))}
    else:
        scale = math.sqrt(task.chain.dim / 2)
        out = {"mmd": mmd(drawn.numpy(), reference.numpy(), tuple(b * scale for b in (0.5, 1.0, 2.0)))}
    if task.high_mode is not None:
        out["high_mode_mass"] = task.high_mode_mass(drawn)
    return out


def diagnostics(sampler, drawn: torch.Tensor) -> dict:
    """Distinct rows of the draw (any method) and the tree's reuse / draw-rule diagnostics (None where absent)."""
    stats = sampler.stats()
    out = {name: stats.get(key) for name, key in DIAGNOSTICS.items()}
    for name, key in PROFILES.items():  # string levels, as a saved report has them
        out[name] = {str(level): value for level, value in stats[key].items()} if stats.get(key) else None
    out["distinct_draws"] = len(torch.unique(drawn.reshape(len(drawn), -1), dim=0))
    return out


def make_sampler(task: ToyTask, method: str, options: dict, seed: int):
    return build_sampler(
        method,
        task.chain.prior,
        task.chain.transition,
        task.reward,
        task.num_steps,
        lam=task.lam,
        seed=seed,
        batch_size=16,
        renoise=task.chain.renoise,
        **{"branch_levels": task.branch_levels, **options},  # a sampler may bring its own
    )


def trace_checkpoints(task: ToyTask, budgets: list[int]) -> list[int]:
    """20 NFE checkpoints per decade up to the largest budget, the budgets included."""
    low = math.log10(max(2 * task.num_steps, budgets[0] / 10))
    grid = np.round(10 ** np.arange(low, math.log10(budgets[-1]) + 1e-9, 0.05)).astype(int)
    return sorted({*grid.tolist(), *budgets})


def run_method(
    task: ToyTask, methods: dict, label: str, budgets: list[int], seed: int, measure, trace: list[int] | None = None
) -> tuple[list[dict], list[list[float]] | None]:
    """Grow an anytime sampler through the budgets (rebuild the others at each) and measure it at every budget.

    With `trace` (NFE checkpoints; anytime methods only), also return [checkpoint, best reward so far] at each
    checkpoint and budget (the checkpoint is the NFE granted; the sampler may have spent a few less)."""
    method, options = methods[label]
    anytime = method in ANYTIME
    rows, curve = [], ([] if trace is not None and anytime else None)
    sampler = make_sampler(task, method, options, seed)
    granted = 0  # NFE granted so far: run() adds to the sampler's target, so the tree equals one run(budget)
    for budget in budgets:
        if not anytime:
            sampler, granted = make_sampler(task, method, options, seed), 0
        start = time.perf_counter()
        for point in (c for c in trace or () if curve is not None and granted < c < budget):
            sampler.run(point - granted)
            granted = point
            curve.append([point, float(sampler.best()[1])])
        sampler.run(budget - granted)
        granted = budget
        if curve is not None:
            curve.append([budget, float(sampler.best()[1])])
        elapsed = time.perf_counter() - start
        row = {"method": label, "seed": seed, "budget": budget, "nfe": sampler.nfe, "seconds": elapsed}
        rows.append(row | measure(sampler))
    return rows, curve


def search_measure(sampler) -> dict:
    with warnings.catch_warnings():  # a small tree repeats its best leaves; distinct_draws records it
        warnings.filterwarnings("ignore", message="search asked for")
        top, rewards = sampler.sample(TOP, return_rewards=True)
    out = {"top_mean_reward": float(rewards.mean()), "best_reward": float(sampler.best()[1])}
    return out | diagnostics(sampler, top)


def noise_floor(task: ToyTask, draws: int, seeds: int) -> dict:
    """Distance between two independent exact samples of the same size: nothing can beat it."""
    values = [
        distances(task, task.target_samples(draws, 100 + s), task.target_samples(draws, 200 + s)) for s in range(seeds)
    ]
    return {key: float(np.median([v[key] for v in values])) for key in values[0] if key != "high_mode_mass"}


def engine_cost(node_targets, probe_budget: int) -> dict:
    """Bookkeeping seconds per iteration of the default DTS near each node count, with a zero-cost chain
    (benchmarks/engine_cost.py); then the share of wall time outside `transition` and `reward` on gmm-2d at
    `probe_budget` NFE."""
    out = bookkeeping_by_size(node_targets)

    task = gmm_2d()
    probe = make_sampler(task, "dts", {}, 0)
    start = time.perf_counter()
    probe.run(probe_budget)
    wall = time.perf_counter() - start
    t = probe.timings
    out["gmm_2d_probe_nfe"] = probe_budget
    out["gmm_2d_share_outside_transition_and_reward"] = 1 - (t.transition + t.reward) / wall
    out["gmm_2d_wall_seconds"] = wall
    return out


# ---------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------
def runs_by_method(rows: list[dict], key: str) -> dict:
    """{method: {budget: [`key` of each seed's run]}}; rows where `key` is None are left out."""
    table = {}
    for r in rows:
        if r.get(key) is not None:
            table.setdefault(r["method"], {}).setdefault(r["budget"], []).append(r[key])
    return table


def summarise(rows: list[dict], key: str) -> dict:
    """{method: {budget: {median, min, max}}} over seeds; rows where `key` is None are left out, and so is a method
    that never has it."""
    table = runs_by_method(rows, key)
    return {
        m: {
            str(n): {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for n, v in sorted(d.items())
        }
        for m, d in table.items()
    }


def medians(entry: dict, keys: tuple[str, ...]) -> dict:
    """{label: {budget: {key: median}}} from an entry's summaries, for the ranking tables."""
    labels = entry["summary"][keys[0]]
    return {
        m: {b: {k: entry["summary"][k][m][str(b)]["median"] for k in keys} for b in entry["budgets"]} for m in labels
    }


def reaching(entry: dict, key: str, target: float) -> dict:
    """The NFE at which each sampler's median first reaches `target`, and DTS's ratio to the best baseline's NFE.

    The ratio is DTS's NFE over the best baseline's (below 1: DTS needs less); a method that never reaches the
    target within the budgets gets None, and so does the ratio when either side never reaches it."""
    table = medians(entry, (key,))
    nfe = {m: nfe_to_reach({b: p[key] for b, p in table[m].items()}, target)[0] for m in table}
    reached = [nfe[m] for m in BASELINES if nfe.get(m) is not None]
    dts = nfe.get("DTS")
    return {
        "target": target,
        "nfe_to_reach": nfe,
        "dts_ratio_to_best_baseline": dts / min(reached) if dts is not None and reached else None,
    }


def targets_reached(entry: dict) -> list[dict]:
    """`reaching` at 2× the noise floor, at the best baseline's distance at the largest budget, and at fixed targets."""
    key = entry["distance"]
    largest = str(entry["budgets"][-1])
    summary = entry["summary"][key]
    run = [m for m in BASELINES if m in summary]  # a design experiment (--sampler) may run no baseline
    baseline = min(run, key=lambda m: summary[m][largest]["median"]) if run else None
    return [
        {"name": "2× the noise floor", **reaching(entry, key, 2 * entry["noise_floor"][key])},
        *([{"name": f"{baseline}'s at NFE {largest}", **reaching(entry, key, summary[baseline][largest]["median"])}]
          if baseline else []),
        *({"name": "fixed", **reaching(entry, key, t)} for t in FIXED_TARGETS[key]),
    ]  # fmt: skip


def head_to_head(entry: dict) -> dict:
    """{tree label: {baseline: {budget: P(closer)}}}: the share of (tree seed, baseline seed) pairs in which the tree's
    run is the closer to π* (ties count half; the Mann–Whitney statistic). Medians of 5–10 seeds whose worst is 2–5×
    the median move by ±15 %; this says how often one method's run beats the other's, which a gap of medians hides."""
    runs = runs_by_method(entry["rows"], entry["distance"])
    trees = [m for m in runs if m not in BASELINES and m != "DTS (paper)"]
    out = {}
    for tree in trees:
        for baseline in (b for b in ("best-of-N", "SMC") if b in runs):
            for budget, ours in runs[tree].items():
                theirs = runs[baseline].get(budget)
                if theirs:
                    a, b = np.array(ours)[:, None], np.array(theirs)[None]
                    share = float((a < b).mean() + 0.5 * (a == b).mean())
                    out.setdefault(tree, {}).setdefault(baseline, {})[str(budget)] = share
    return out


def search_reaching(entry: dict) -> dict:
    """For each traced searcher: the first NFE at which it reaches best-of-N's median best reward at the largest
    budget (on its median curve over seeds, and per seed), and best-of-N's budget over that NFE."""
    largest = entry["budgets"][-1]
    target = entry["summary"]["best_reward"]["best-of-N"][str(largest)]["median"]
    out = {"target": target, "budget": largest, "methods": {}}
    for label, curves in entry.get("traces", {}).items():
        per_seed = [nfe_to_reach(dict(c), target, lower_is_better=False)[0] for c in curves.values()]
        points = [dict(c) for c in curves.values()]
        common = sorted(set.intersection(*(set(p) for p in points)))
        median_curve = {n: float(np.median([p[n] for p in points])) for n in common}
        nfe = nfe_to_reach(median_curve, target, lower_is_better=False)[0]
        out["methods"][label] = {
            "nfe_median_curve": nfe,
            "nfe_per_seed": per_seed,
            "ratio": largest / nfe if nfe else None,
        }
    return out


def finish(report: dict) -> dict:
    """Recompute the derived parts (reaching targets), so a report rebuilt from JSON follows the current code."""
    for entry in report["sampling"].values():
        entry["targets"] = targets_reached(entry)
        entry["head_to_head"] = head_to_head(entry)
    for entry in report["search"].values():
        if "best-of-N" in entry["summary"]["best_reward"]:
            entry["reaching"] = search_reaching(entry)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def shown_budgets(budgets: list[int]) -> list[int]:
    return list(dict.fromkeys([budgets[0], budgets[len(budgets) // 2], budgets[-1]]))


def reaching_lines(entry: dict) -> list[str]:
    """A Markdown bullet per target: the NFE each sampler first reaches it at; DTS's ratio to the best baseline."""
    lines = []
    for found in entry["targets"]:
        nfe = ", ".join(f"{m} {n if n is not None else '—'}" for m, n in found["nfe_to_reach"].items())
        ratio = found["dts_ratio_to_best_baseline"]
        lines.append(
            f"- first NFE at {entry['distance'].upper()} ≤ {found['target']:.3g} ({found['name']}): {nfe}; "
            + (
                f"DTS needs {ratio:.2g}× the best baseline's NFE"
                if ratio is not None
                else "no ratio (one side never reaches it)"
            )
        )
    return lines


def head_to_head_lines(entry: dict) -> list[str]:
    """A Markdown bullet per tree: how often its run is closer to π* than each baseline's, at every budget."""
    shown = [str(b) for b in entry["budgets"]]
    lines = []
    for tree, against in entry.get("head_to_head", {}).items():
        parts = [
            f"{baseline} in " + ", ".join(f"{100 * shares[b]:.0f} % at NFE {b}" for b in shown if b in shares)
            for baseline, shares in against.items()
        ]
        if parts:
            lines.append(f"- {tree} is closer to π* than " + "; than ".join(parts) + " of all pairs of seeds")
    return lines


def diagnostics_table(entry: dict) -> list[str]:
    """method × budget → "NFE per leaf, draw ESS" (medians), for the methods that report them (the tree)."""
    per_leaf = entry["summary"].get("nfe_per_leaf", {})
    if not per_leaf:
        return []
    ess = entry["summary"].get("draw_ess", {})
    budgets = entry["budgets"]
    lines = [
        "| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method, series in per_leaf.items():
        cells = []
        for b in budgets:
            leaf = series.get(str(b), {}).get("median")
            e = ess.get(method, {}).get(str(b), {}).get("median")
            cells.append(("—" if leaf is None else f"{leaf:.1f}") + ("" if e is None else f", {e:.0f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def reuse_table(entry: dict) -> list[str]:
    """At the largest budget, per tree and level (medians over seeds): the share of NFE spent by rollouts starting
    there (the root's: new x_T seeds) and the draw's ESS over the level's nodes, the independent lineages the draws
    rest on there; the last row, the draw's ESS over the leaves and the leaves it may reach. Empty for a report
    without these profiles."""
    budget = entry["budgets"][-1]
    spent = {m: d[budget] for m, d in runs_by_method(entry["rows"], "nfe_by_level").items() if budget in d}
    if not spent:
        return []
    lineages = runs_by_method(entry["rows"], "lineage_ess_by_level")
    leaves = {key: runs_by_method(entry["rows"], key) for key in ("draw_ess", "draw_eligible_leaves")}
    node_levels = {int(lv) for d in lineages.values() for r in d.get(budget, []) for lv in r}
    start_levels = {int(lv) for runs in spent.values() for r in runs for lv in r}
    root = max(start_levels) if node_levels and max(start_levels) > max(node_levels) else None
    levels = sorted(node_levels | start_levels, reverse=True)

    def median(profiles: list[dict], level: int, share: bool = False) -> float | None:
        found = [p.get(str(level), 0) / (sum(p.values()) if share else 1) for p in profiles]
        return float(np.median(found)) if found else None

    def cells(method: str, level: int) -> list[str]:
        share = median(spent[method], level, share=True)
        ess = median(lineages.get(method, {}).get(budget, []), level) if level != root else None
        return [f"{share:.2f}" if share is not None else "—", f"{ess:.0f}" if ess is not None else "—"]

    def leaf_cells(method: str) -> list[str]:
        ess, eligible = (np.median(leaves[k].get(method, {}).get(budget, [math.nan])) for k in leaves)
        return ["—", f"{ess:.0f} of {eligible:.0f} eligible"]

    methods = list(spent)
    lines = [
        f"Reuse at NFE {budget} (medians over seeds): the share of NFE spent by rollouts starting at each level "
        "(seeds: from the root) and the draw's ESS over the level's nodes, the independent lineages the draws rest "
        "on there; at the leaves, the draw's ESS and the leaves a draw may reach.",
        "",
        "| level | " + " | ".join(f"{m}: NFE share | {m}: lineages" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for level in levels:
        name = "seeds (root)" if level == root else f"ℓ = {level}"
        lines.append(f"| {name} | " + " | ".join(c for m in methods for c in cells(m, level)) + " |")
    lines.append("| leaves | " + " | ".join(c for m in methods for c in leaf_cells(m)) + " |")
    return lines


def sampling_section(name: str, entry: dict) -> list[str]:
    key = entry["distance"]
    has_mass = "high_mode_mass" in entry["summary"]
    keys = (key, "high_mode_mass") if has_mass else (key,)
    mass_note = f" / high-mode mass; π* puts {entry['target_high_mode_mass']:.3f} there" if has_mass else ""
    cell = (
        (lambda p: f"{p[key]:.3f} / {p['high_mode_mass']:.2f}") if has_mass else (lambda p: f"{p[key]:.3f}")
    )  # fmt: skip
    return [
        f"### Sampling, {name}",
        "",
        f"{seed_count(entry)} seeds. Cell: {key.upper()} to π*{mass_note}; "
        f"noise floor {entry['noise_floor'][key]:.3f}.",
        "",
        *ranking_table(medians(entry, keys), shown_budgets(entry["budgets"]), key, True, cell),
        "",
        *reaching_lines(entry),
        *head_to_head_lines(entry),
        "",
        "Distinct samples among the draws (median): "
        + "; ".join(
            f"{m} {int(s[str(entry['budgets'][-1])]['median'])}" for m, s in entry["summary"]["distinct_draws"].items()
        )
        + f" at NFE {entry['budgets'][-1]}.",
        "",
        *(
            ["Tree diagnostics (cell: NFE per leaf, draw ESS over leaves; medians):", "", *diagnostics_table(entry), ""]
            if entry["summary"].get("nfe_per_leaf")
            else []
        ),
        *([*table, ""] if (table := reuse_table(entry)) else []),
    ]


def search_section(name: str, entry: dict) -> list[str]:
    lines = [
        f"### Search, {name.removeprefix('search-')}",
        "",
        f"{seed_count(entry)} seeds. Cell: mean reward of the {TOP} best samples returned / best reward found.",
        "",
        *ranking_table(
            medians(entry, ("top_mean_reward", "best_reward")),
            shown_budgets(entry["budgets"]),
            "top_mean_reward",
            False,
            lambda p: f"{p['top_mean_reward']:.3f} / {p['best_reward']:.3f}",
        ),
        "",
    ]
    found = entry.get("reaching")
    if found:
        for label, r in found["methods"].items():
            seeds = ", ".join(str(n) if n is not None else "—" for n in r["nfe_per_seed"])
            lines.append(
                f"- {label} first reaches best-of-N's best reward at NFE {found['budget']} ({found['target']:.3f}) "
                + (
                    f"at NFE {r['nfe_median_curve']} (median curve; per seed {seeds}): best-of-N's budget over it "
                    f"{r['ratio']:.2g}× (acceptance ≥ 5×)"
                    if r["nfe_median_curve"]
                    else f"never within NFE {found['budget']} on its median curve (per seed {seeds})"
                )
            )
        lines.append("")
    if entry["summary"].get("nfe_per_leaf"):
        lines += ["Tree diagnostics (cell: NFE per leaf; medians):", "", *diagnostics_table(entry), ""]
    return lines


def markdown(report: dict) -> str:
    seeds = " or ".join(map(str, seed_counts(report) or [report["seeds"]]))
    lines = [
        f"Medians over {seeds} seeds (each section says how many); {report['draws']} draws per sampler; ranked at "
        "three budgets. "
        "MMD: Gaussian kernels of bandwidths (0.5, 1, 2)·√(d/2).",
        "",
    ]
    for name, entry in report["sampling"].items():
        lines += sampling_section(name, entry)
    for name, entry in report["search"].items():
        lines += search_section(name, entry)
    cost = report.get("engine_cost")
    if cost:
        lines += ["### Engine cost", ""]
        for k, v in cost.items():
            if k.startswith("seconds_per_iteration_at_"):
                target = k.split("_at_")[1].split("_")[0]
                low, high = cost.get(f"nodes_measured_near_{target}", [target, target])
                lines.append(f"- bookkeeping {v * 1e3:.3f} ms per iteration at {low}–{high} nodes (target {target})")
        if "gmm_2d_share_outside_transition_and_reward" in cost:
            share = 100 * cost["gmm_2d_share_outside_transition_and_reward"]
            lines.append(
                f"- gmm-2d, {cost['gmm_2d_probe_nfe']} NFE: {share:.0f}% of {cost['gmm_2d_wall_seconds']:.1f} s "
                "outside transition and reward"
            )
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def run_sampling_task(
    name: str, budgets: list[int], seeds: range, draws: int, clock: float, samplers: dict = SAMPLERS
) -> dict:
    task = SAMPLING_TASKS[name][0]()
    key = distance_key(task)
    reference = task.target_samples(draws, 0)

    def measure(sampler) -> dict:
        drawn = sampler.sample(draws)
        return distances(task, drawn, reference) | diagnostics(sampler, drawn)

    rows = []
    for seed in seeds:
        for label in samplers:
            new, _ = run_method(task, samplers, label, budgets, seed, measure)
            rows += new
            last = new[-1]
            mass = f", mass {last['high_mode_mass']:.3f}" if "high_mode_mass" in last else ""
            print(
                f"[{time.perf_counter() - clock:7.0f}s] {name} seed {seed} {label}: {key} {last[key]:.4f}{mass} at NFE "
                f"{last['nfe']} ({sum(r['seconds'] for r in new):.1f}s)",
                flush=True,
            )
    keys = [key, "distinct_draws", "seconds", *DIAGNOSTICS]
    entry = {"budgets": budgets, "distance": key, "noise_floor": noise_floor(task, draws, 5), "rows": rows}
    if task.high_mode is not None:
        entry["target_high_mode_mass"] = task.high_mode_mass(task.target_samples(200_000, 1))
        keys.append("high_mode_mass")
    entry["summary"] = {k: summarise(rows, k) for k in keys}
    return entry


def run_search_task(name: str, budgets: list[int], seeds: range, clock: float) -> dict:
    task = SEARCH_TASKS[name][0]()
    checkpoints = trace_checkpoints(task, budgets)
    rows, traces = [], {}
    for seed in seeds:
        for label in SEARCHERS:
            trace = checkpoints if label in TRACED else None
            new, curve = run_method(task, SEARCHERS, label, budgets, seed, search_measure, trace)
            rows += new
            if curve is not None:
                traces.setdefault(label, {})[str(seed)] = curve
            last = new[-1]
            print(
                f"[{time.perf_counter() - clock:7.0f}s] {name} seed {seed} {label}: top-{TOP} mean "
                f"{last['top_mean_reward']:.3f}, best {last['best_reward']:.3f} at NFE {last['nfe']} "
                f"({sum(r['seconds'] for r in new):.1f}s)",
                flush=True,
            )
    keys = ("top_mean_reward", "best_reward", "distinct_draws", "seconds", *DIAGNOSTICS)
    return {
        "budgets": budgets,
        "top": TOP,
        "rows": rows,
        "traces": traces,
        "summary": {k: summarise(rows, k) for k in keys},
    }


def empty_report(seeds: int, draws: int, quick: bool) -> dict:
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "draws": draws,
        "seeds": seeds,
        "quick": quick,
        "sampling": {},
        "search": {},
    }


def merge_sampling(old: dict, new: dict) -> dict:
    """A sampling task's entry with `new`'s rows replacing `old`'s of the same sampler and seed, the others kept: one
    sampler can be rerun alone, and runs of other seeds (another process, `--first-seed`) join the medians."""
    runs = {(row["method"], row["seed"]) for row in new["rows"]}
    rows = [row for row in old["rows"] if (row["method"], row["seed"]) not in runs] + new["rows"]
    return new | {"budgets": old["budgets"], "rows": rows, "summary": {k: summarise(rows, k) for k in old["summary"]}}


def seed_count(entry: dict) -> int:
    return len({row["seed"] for row in entry["rows"]})


def seed_counts(report: dict) -> list[int]:
    """Each task's number of seeds, sorted and distinct."""
    return sorted({seed_count(entry) for part in ("sampling", "search") for entry in report[part].values()})


def merge(reports: list[dict]) -> dict:
    """One report with the task entries of all: a later file's search entry replaces an earlier one of the same task;
    its sampling rows replace the earlier rows of the same sampler and seed (`merge_sampling`)."""
    out = {k: v for k, v in reports[0].items() if k not in ("sampling", "search", "engine_cost")}
    out |= {"sampling": {}, "search": {}}
    for r in reports:
        for task, entry in r.get("sampling", {}).items():
            old = out["sampling"].get(task)
            same = old is not None and old["budgets"] == entry["budgets"]
            out["sampling"][task] = merge_sampling(old, entry) if same else entry
        out["search"] |= r.get("search", {})
        if r.get("engine_cost"):
            out["engine_cost"] = out.get("engine_cost", {}) | r["engine_cost"]
        if r["draws"] != out["draws"]:
            print(f"warning: merging reports with different draws per sampler ({r['draws']})", flush=True)
    order = {name: i for i, name in enumerate(ALL_TASKS)}
    for part in ("sampling", "search"):
        out[part] = dict(sorted(out[part].items(), key=lambda kv: order.get(kv[0], len(order))))
    out["seeds"] = max(seed_counts(out), default=out["seeds"])  # disjoint seed runs add up
    return out


def save(report: dict, out: Path, name: str) -> str:
    finish(report)
    table = markdown(report)
    write_atomically(out / f"{name}.json", json.dumps(report, indent=1))
    write_atomically(out / f"{name}.md", table)
    plot(report, out / f"{name}.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, one seed: a smoke test, not results")
    parser.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=ALL_TASKS, metavar="NAME", help=str(ALL_TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed, first-seed + 1, …")
    parser.add_argument("--draws", type=int, default=2000, help="draws per sampler and measurement (300 under --quick)")
    parser.add_argument("--engine-nodes", type=int, nargs="+", help=f"engine-cost node counts (default {ENGINE_NODES})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output stem (default toy, or toy_quick under --quick)")
    parser.add_argument(
        "--from-json", type=Path, nargs="+", help="merge saved reports and rebuild the tables and plot, running nothing"
    )
    parser.add_argument("--budgets", type=int, nargs="+", help="replace the tasks' budgets (design experiments)")
    parser.add_argument(
        "--sampler",
        action="append",
        metavar="LABEL=METHOD[:JSON]",
        help="run these samplers instead of the default set, e.g. 'DTS (β=1)=dts:{\"level_cost_exponent\": 1}'",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("toy_quick" if args.quick else "toy")

    if args.from_json:
        table = save(merge([json.loads(p.read_text()) for p in args.from_json]), args.out, name)
        print(table)
        return

    samplers = dict(map(parse_sampler, args.sampler)) if args.sampler else SAMPLERS
    seeds = range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))
    draws = 300 if args.quick else args.draws
    report = empty_report(len(seeds), draws, args.quick)
    clock = time.perf_counter()
    for task in args.tasks:
        if task in SAMPLING_TASKS:
            budgets = args.budgets or (QUICK_BUDGETS if args.quick else SAMPLING_TASKS[task][1])
            report["sampling"][task] = run_sampling_task(task, budgets, seeds, draws, clock, samplers)
        elif task in SEARCH_TASKS:
            budgets = args.budgets or (QUICK_BUDGETS if args.quick else SEARCH_TASKS[task][1])
            report["search"][task] = run_search_task(task, budgets, seeds, clock)
        else:
            nodes = args.engine_nodes or ((2_000, 10_000) if args.quick else ENGINE_NODES)
            report["engine_cost"] = engine_cost(nodes, QUICK_BUDGETS[-1] if args.quick else BUDGETS[-1])
        save(report, args.out, name)
        print(f"[{time.perf_counter() - clock:7.0f}s] {task} done; wrote {args.out / name}.json", flush=True)
    print(markdown(report))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for task, entry in report["sampling"].items():
        key = entry["distance"]
        panels.append((entry, key, f"{task}: {key.upper()} to π*"))
        if "high_mode_mass" in entry["summary"]:
            panels.append((entry, "high_mode_mass", f"{task}: high-mode mass"))
    for task, entry in report["search"].items():
        short = task.removeprefix("search-")
        panels.append((entry, "top_mean_reward", f"search {short}: mean reward of the {TOP} best"))
        panels.append((entry, "best_reward", f"search {short}: best reward"))
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    handles = {}
    for ax, (entry, key, title) in zip(axes.flat, panels, strict=False):
        for method, series in entry["summary"][key].items():
            nfe = [int(n) for n in series]
            med = [series[n]["median"] for n in series]
            lo = [series[n]["min"] for n in series]
            hi = [series[n]["max"] for n in series]
            (line,) = ax.plot(nfe, med, marker="o", label=method, color=COLORS.get(method))
            ax.fill_between(nfe, lo, hi, alpha=0.15, color=line.get_color())
            handles.setdefault(method, line)
        if key == "high_mode_mass":
            handles["π*"] = ax.axhline(entry["target_high_mode_mass"], color="k", ls="--", label="π*")
        elif key in entry.get("noise_floor", {}):
            handles["noise floor"] = ax.axhline(entry["noise_floor"][key], color="k", ls="--", label="noise floor")
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 8), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
