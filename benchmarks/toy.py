"""Exact toy chains: distance to π* for the samplers, reward found for the searchers, all at equal NFE.

- sampling, bimodal-1d: an exact 20-step mixture chain with a rare high-reward mode (the setting of the known finding
  in issue 2): Wasserstein-1 to π* and the mass on the high mode, for DTS with the held-out estimator (default), DTS
  with the paper's rule, best-of-N with importance resampling, SMC and FK-steering.
- sampling, gmm-2d: the paper's 2D GMM task (100 steps, branch every 20): MMD to π*.
  For both sampling tasks: the NFE at which each sampler's median first reaches 2× the noise floor, the best
  baseline's distance at the largest budget and fixed distances, with DTS's NFE ratio to the best baseline.
- search, gmm-2d: DTS*, best-of-N, BFS (increasing temperature, max scoring, SSP), SVDD, DFS with backtracking,
  BFS with local search and DAS (without gradients): the mean reward of the 100 best samples each returns, and
  the best reward found.
- engine cost: bookkeeping time per iteration (selection, expansion, backup) at 10^4 and 10^5 nodes, and the share
  of wall time spent outside `transition` and `reward` on the 2D task.

Draws in sample mode are stratified for every method (systematic shares), so the comparison is between estimators.
Writes benchmarks/results/toy.json, toy.md and toy.png. `--quick` runs tiny budgets (a smoke test, not results);
`--from-json` rebuilds the tables and plot from a saved report.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ranking import first_reaching, ranking_table, write_atomically
from scipy.stats import wasserstein_distance

from dts_diffusers.engine import DTS
from dts_diffusers.methods import build_sampler
from dts_diffusers.toy import ToyTask, bimodal_1d, gmm_2d

RESULTS = Path(__file__).parent / "results"
SAMPLERS = {  # label -> (method, options)
    "DTS (held-out)": ("dts", {}),
    "DTS (paper rule)": ("dts", {"estimator": "paper"}),
    "best-of-N": ("best-of-n", {}),
    "SMC": ("smc", {}),
    "FK": ("fk", {}),
}
SEARCHERS = {
    "DTS*": ("dts*", {}),
    "best-of-N": ("best-of-n", {"mode": "search"}),
    "BFS": ("bfs", {"mode": "search"}),
    "SVDD": ("svdd", {"mode": "search"}),
    "DFS": ("dfs", {"mode": "search"}),
    "BFS + local search": ("bfs", {"mode": "search", "local_search_steps": 1, "local_search_step_size": 0.01}),
    "DAS": ("das", {"mode": "search"}),
}
BASELINES = ("best-of-N", "SMC", "FK")
FIXED_TARGETS = {"w1": (0.3, 0.15, 0.1), "mmd": (0.3, 0.15, 0.1)}  # distances every sampler is asked to reach
ANYTIME = {"dts", "dts*", "best-of-n"}  # a later run(b) continues the same sampler exactly
TOP = 100  # search: mean reward of the best TOP samples returned
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
)
COLORS = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys([*SAMPLERS, *SEARCHERS]))}


def mmd(x: np.ndarray, y: np.ndarray, bandwidths=(0.5, 1.0, 2.0)) -> float:
    """Biased MMD with a sum of Gaussian kernels (positive, so comparable with its noise floor)."""
    xy = np.concatenate([x, y])
    sq = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    k = sum(np.exp(-sq / (2 * b**2)) for b in bandwidths)
    n = len(x)
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(math.sqrt(max(value, 0.0)))


def distances(task: ToyTask, drawn: torch.Tensor, reference: torch.Tensor) -> dict:
    if task.chain.dim == 1:
        a, b = drawn.flatten().numpy(), reference.flatten().numpy()
        return {"w1": float(wasserstein_distance(a, b)), "high_mode_mass": float((a > 0).mean())}
    return {"mmd": mmd(drawn.numpy(), reference.numpy())}


def run_method(task: ToyTask, methods: dict, label: str, budgets: list[int], seed: int, measure) -> list[dict]:
    """Grow an anytime sampler through the budgets (rebuild the others at each) and measure it at every budget."""
    method, options = methods[label]
    rows = []
    make = lambda: build_sampler(  # noqa: E731
        method,
        task.chain.prior,
        task.chain.transition,
        task.reward,
        task.num_steps,
        lam=task.lam,
        seed=seed,
        branch_levels=task.branch_levels,
        batch_size=16,
        renoise=task.chain.renoise,
        **options,
    )
    sampler = make()
    for budget in budgets:
        if method not in ANYTIME:
            sampler = make()
        start = time.perf_counter()
        sampler.run(budget - sampler.nfe)
        elapsed = time.perf_counter() - start
        row = {"method": label, "seed": seed, "budget": budget, "nfe": sampler.nfe, "seconds": elapsed}
        rows.append(row | measure(sampler))
    return rows


def search_measure(sampler) -> dict:
    _, rewards = sampler.sample(TOP, return_rewards=True)
    return {"top_mean_reward": float(rewards.mean()), "best_reward": float(sampler.best()[1])}


def noise_floor(task: ToyTask, draws: int, seeds: int) -> dict:
    """Distance between two independent exact samples of the same size: nothing can beat it."""
    values = [
        distances(task, task.target_samples(draws, 100 + s), task.target_samples(draws, 200 + s)) for s in range(seeds)
    ]
    return {key: float(np.median([v[key] for v in values])) for key in values[0]}


def engine_cost(quick: bool) -> dict:
    """Bookkeeping seconds per iteration near 10^4 and 10^5 nodes, with a near-free transition and reward."""

    def prior(n, gens):
        return torch.zeros(n, 2)

    def transition(x, level, gens):
        return x

    out = {}
    targets = (2_000, 10_000) if quick else (10_000, 100_000)
    dts = DTS(prior, transition, lambda x: torch.rand(len(x)), num_steps=10, branch_levels=[10, 8, 6, 4, 2], seed=0)
    for target in targets:
        while dts.stats()["nodes"] < 0.9 * target:
            dts.run(10_000)
        before_t, before_i = dts.timings.bookkeeping, dts.iterations
        dts.run(10_000)
        out[f"seconds_per_iteration_at_{target}_nodes"] = (dts.timings.bookkeeping - before_t) / (
            dts.iterations - before_i
        )
    return out


def reaching(entry: dict, key: str, target: float) -> dict:
    """The NFE at which each sampler's median first reaches `target`, and DTS's ratio to the best baseline's NFE.

    The ratio is DTS's NFE over the best baseline's (below 1: DTS needs less); a method that never reaches the
    target within the budgets gets None, and so does the ratio when either side never reaches it."""
    table = medians(entry, (key,))
    nfe = {m: first_reaching({b: p[key] for b, p in table[m].items()}, target) for m in SAMPLERS}
    reached = [nfe[m] for m in BASELINES if nfe[m] is not None]
    dts = nfe["DTS (held-out)"]
    return {
        "target": target,
        "nfe_to_reach": nfe,
        "dts_ratio_to_best_baseline": dts / min(reached) if dts is not None and reached else None,
    }


def summarise(rows: list[dict], key: str) -> dict:
    table = {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["budget"], []).append(r[key])
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


def targets_reached(entry: dict, key: str) -> list[dict]:
    """`reaching` at 2× the noise floor, at the best baseline's distance at the largest budget, and at fixed targets."""
    largest = str(entry["budgets"][-1])
    baseline = min(BASELINES, key=lambda m: entry["summary"][key][m][largest]["median"])
    return [
        {"name": "2× the noise floor", **reaching(entry, key, 2 * entry["noise_floor"][key])},
        {
            "name": f"{baseline}'s at NFE {largest}",
            **reaching(entry, key, entry["summary"][key][baseline][largest]["median"]),
        },
        *({"name": "fixed", **reaching(entry, key, t)} for t in FIXED_TARGETS[key]),
    ]


def reaching_lines(entry: dict, key: str) -> list[str]:
    """A Markdown bullet per target: the NFE each sampler first reaches it at; DTS's ratio to the best baseline."""
    lines = []
    for found in entry["targets"]:
        nfe = ", ".join(f"{m} {n if n is not None else '—'}" for m, n in found["nfe_to_reach"].items())
        ratio = found["dts_ratio_to_best_baseline"]
        lines.append(
            f"- first NFE at {key} ≤ {found['target']:.3g} ({found['name']}): {nfe}; "
            + (
                f"DTS needs {ratio:.2g}× the best baseline's NFE"
                if ratio is not None
                else "no ratio (one side never reaches it)"
            )
        )
    return lines


def markdown(report: dict) -> str:
    shown = report["gmm-2d"]["budgets"][::2]
    lines = [
        f"Medians over {report['seeds']} seeds; {report['draws']} draws per sampler; ranked at three budgets.",
        "",
        "Sampling, bimodal-1d (cell: W1 to π* / high-mode mass; π* puts "
        f"{report['bimodal-1d']['target_high_mode_mass']:.3f} there, noise floor W1 "
        f"{report['bimodal-1d']['noise_floor']['w1']:.3f}):",
        "",
        *ranking_table(
            medians(report["bimodal-1d"], ("w1", "high_mode_mass")),
            shown,
            "w1",
            True,
            lambda p: f"{p['w1']:.3f} / {p['high_mode_mass']:.2f}",
        ),
        "",
        *reaching_lines(report["bimodal-1d"], "W1"),
        "",
        f"Sampling, gmm-2d (cell: MMD to π*; noise floor {report['gmm-2d']['noise_floor']['mmd']:.3f}):",
        "",
        *ranking_table(medians(report["gmm-2d"], ("mmd",)), shown, "mmd", True, lambda p: f"{p['mmd']:.3f}"),
        "",
        *reaching_lines(report["gmm-2d"], "MMD"),
        "",
        f"Search, gmm-2d (cell: mean reward of the {TOP} best samples returned / best reward found):",
        "",
        *ranking_table(
            medians(report["search-gmm-2d"], ("top_mean_reward", "best_reward")),
            shown,
            "top_mean_reward",
            False,
            lambda p: f"{p['top_mean_reward']:.3f} / {p['best_reward']:.3f}",
        ),
    ]
    return "\n".join(lines)


def measure_all(quick: bool, seeds: int) -> dict:
    """Every sampler and searcher on every task at every budget and seed, and the engine's cost."""
    seeds = 1 if quick else seeds
    draws = 300 if quick else 2000
    budgets = [400, 1000, 2000] if quick else [1000, 3000, 10_000, 30_000, 100_000]
    report: dict = {"platform": platform.platform(), "torch": torch.__version__, "draws": draws, "seeds": seeds}

    for name, task, key in (("bimodal-1d", bimodal_1d(), "w1"), ("gmm-2d", gmm_2d(), "mmd")):
        reference = task.target_samples(draws, 0)

        def measure(sampler, task=task, reference=reference) -> dict:
            return distances(task, sampler.sample(draws), reference)

        rows = []
        for label in SAMPLERS:
            for seed in range(seeds):
                rows += run_method(task, SAMPLERS, label, budgets, seed, measure)
                print(name, label, seed, rows[-1], flush=True)
        floor = noise_floor(task, draws, 5)
        entry = {"budgets": budgets, "noise_floor": floor, "rows": rows, "summary": {key: summarise(rows, key)}}
        if name == "bimodal-1d":
            entry["target_high_mode_mass"] = float((task.target_samples(200_000, 1) > 0).float().mean())
            entry["summary"]["high_mode_mass"] = summarise(rows, "high_mode_mass")
        entry["targets"] = targets_reached(entry, key)
        report[name] = entry

    task = gmm_2d()
    rows = []
    for label in SEARCHERS:
        for seed in range(seeds):
            rows += run_method(task, SEARCHERS, label, budgets, seed, search_measure)
            print("search gmm-2d", label, seed, rows[-1], flush=True)
    report["search-gmm-2d"] = {
        "budgets": budgets,
        "top": TOP,
        "rows": rows,
        "summary": {key: summarise(rows, key) for key in ("top_mean_reward", "best_reward")},
    }

    report["engine_cost"] = engine_cost(quick)
    probe = build_sampler(
        "dts", task.chain.prior, task.chain.transition, task.reward, task.num_steps, lam=task.lam, seed=0,
        branch_levels=task.branch_levels,
    )  # fmt: skip
    start = time.perf_counter()
    probe.run(budgets[-1])
    wall = time.perf_counter() - start
    t = probe.timings
    report["engine_cost"]["gmm_2d_share_outside_transition_and_reward"] = 1 - (t.transition + t.reward) / wall
    report["engine_cost"]["gmm_2d_wall_seconds"] = wall
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, not results")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--from-json", type=Path, help="rebuild the tables and plot from a saved report, running nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        for name, key in (("bimodal-1d", "w1"), ("gmm-2d", "mmd")):
            report[name]["targets"] = targets_reached(report[name], key)
    else:
        report = measure_all(args.quick, args.seeds)

    args.out.mkdir(parents=True, exist_ok=True)
    name = "toy_quick" if args.quick else "toy"
    table = markdown(report)
    print(table)
    write_atomically(args.out / f"{name}.json", json.dumps(report, indent=1))
    write_atomically(args.out / f"{name}.md", table + "\n")
    plot(report, args.out / f"{name}.png")
    print(json.dumps(report["engine_cost"], indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("bimodal-1d", "w1", "sampling: W1 to π* (1D)"),
        ("bimodal-1d", "high_mode_mass", "sampling: high-mode mass (1D)"),
        ("gmm-2d", "mmd", "sampling: MMD to π* (2D GMM)"),
        ("search-gmm-2d", "top_mean_reward", f"search: mean reward of the {TOP} best (2D GMM)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (task, key, title) in zip(axes, panels, strict=True):
        for method, series in report[task]["summary"][key].items():
            nfe = [int(n) for n in series]
            med = [series[n]["median"] for n in series]
            lo = [series[n]["min"] for n in series]
            hi = [series[n]["max"] for n in series]
            ax.plot(nfe, med, marker="o", label=method, color=COLORS[method])
            ax.fill_between(nfe, lo, hi, alpha=0.15, color=COLORS[method])
        if key == "high_mode_mass":
            ax.axhline(report[task]["target_high_mode_mass"], color="k", ls="--", label="π*")
        elif key in report[task].get("noise_floor", {}):
            ax.axhline(report[task]["noise_floor"][key], color="k", ls="--", label="noise floor")
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
