"""Distance to the exact target π* against NFE on exact toy chains, for DTS, DTS*, best-of-N and SMC.

- bimodal-1d: an exact 20-step mixture chain with a rare high-reward mode (the setting of the known finding in
  issue 2): Wasserstein-1 to π* and the mass on the high mode, for DTS with the held-out estimator (default), DTS with
  the paper's rule, best-of-N with importance resampling and SMC.
- gmm-2d: the paper's 2D GMM task (100 steps, branch every 20): MMD to π*, and the NFE at which each method first
  reaches a given MMD.
- engine cost: bookkeeping time per iteration (selection, expansion, backup) at 10^4 and 10^5 nodes, and the share
  of wall time spent outside `transition` and `reward` on the 2D task.

Writes benchmarks/results/toy.json and toy.png. `--quick` runs tiny budgets (a smoke test, not results).
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
from scipy.stats import wasserstein_distance

from dts_diffusers.engine import DTS
from dts_diffusers.methods import build_sampler
from dts_diffusers.toy import ToyTask, bimodal_1d, gmm_2d

RESULTS = Path(__file__).parent / "results"
METHODS = {  # label -> (method, options)
    "DTS (held-out)": ("dts", {}),
    "DTS (paper rule)": ("dts", {"estimator": "paper"}),
    "DTS*": ("dts*", {}),
    "best-of-N": ("best-of-n", {}),
    "SMC": ("smc", {}),
}
ANYTIME = {"dts", "dts*", "best-of-n"}
COLORS = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=True))


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


def run_method(task: ToyTask, label: str, budgets: list[int], seed: int, draws: int, reference) -> list[dict]:
    method, options = METHODS[label]
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
        **options,
    )
    sampler = make()
    for budget in budgets:
        if method not in ANYTIME:  # SMC spends its whole budget on one population
            sampler = make()
        start = time.perf_counter()
        sampler.run(budget - sampler.nfe)
        elapsed = time.perf_counter() - start
        drawn = sampler.sample(draws)
        rows.append(
            {"method": label, "seed": seed, "nfe": sampler.nfe, "seconds": elapsed, **distances(task, drawn, reference)}
        )
    return rows


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


def first_reaching(rows: list[dict], label: str, key: str, threshold: float):
    by_nfe = {}
    for r in rows:
        if r["method"] == label:
            by_nfe.setdefault(r["nfe"], []).append(r[key])
    for nfe in sorted(by_nfe):
        if np.median(by_nfe[nfe]) <= threshold:
            return nfe
    return None


def summarise(rows: list[dict], key: str) -> dict:
    table = {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["nfe"], []).append(r[key])
    return {
        m: {
            str(n): {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for n, v in sorted(d.items())
        }
        for m, d in table.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, not results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    draws = 300 if args.quick else 2000
    report: dict = {"platform": platform.platform(), "torch": torch.__version__, "draws": draws, "seeds": seeds}

    tasks = {
        "bimodal-1d": (bimodal_1d(), [400, 1000] if args.quick else [1000, 3000, 10_000, 30_000, 100_000], "w1"),
        "gmm-2d": (gmm_2d(), [400, 1000] if args.quick else [1000, 3000, 10_000, 30_000, 100_000], "mmd"),
    }
    for name, (task, budgets, key) in tasks.items():
        reference = task.target_samples(draws, 0)
        labels = [m for m in METHODS if not (name == "bimodal-1d" and m == "DTS*")]
        rows = []
        for label in labels:
            for seed in range(seeds):
                rows += run_method(task, label, budgets, seed, draws, reference)
                print(name, label, seed, rows[-1], flush=True)
        floor = noise_floor(task, draws, 5)
        entry = {"budgets": budgets, "noise_floor": floor, "rows": rows, "summary": {key: summarise(rows, key)}}
        if name == "bimodal-1d":
            entry["target_high_mode_mass"] = float((task.target_samples(200_000, 1) > 0).float().mean())
            entry["summary"]["high_mode_mass"] = summarise(rows, "high_mode_mass")
        threshold = 2 * floor[key]
        entry["threshold"] = threshold
        entry["first_nfe_within_2x_noise_floor"] = {m: first_reaching(rows, m, key, threshold) for m in labels}
        report[name] = entry

    gmm = report["gmm-2d"]["summary"]["mmd"]
    best_baseline = min(("best-of-N", "SMC"), key=lambda m: gmm[m][str(tasks["gmm-2d"][1][-1])]["median"])
    target_mmd = gmm[best_baseline][str(tasks["gmm-2d"][1][-1])]["median"]
    gmm_rows = report["gmm-2d"]["rows"]
    report["gmm-2d"]["matching"] = {
        "best_baseline": best_baseline,
        "its_mmd_at_largest_budget": target_mmd,
        "nfe_to_reach_it": {m: first_reaching(gmm_rows, m, "mmd", target_mmd) for m in METHODS},
    }
    report["engine_cost"] = engine_cost(args.quick)
    task, budgets, _ = tasks["gmm-2d"]
    probe = build_sampler(
        "dts",
        task.chain.prior,
        task.chain.transition,
        task.reward,
        task.num_steps,
        lam=task.lam,
        seed=0,
        branch_levels=task.branch_levels,
    )
    start = time.perf_counter()
    probe.run(budgets[-1])
    wall = time.perf_counter() - start
    t = probe.timings
    report["engine_cost"]["gmm_2d_share_outside_transition_and_reward"] = 1 - (t.transition + t.reward) / wall
    report["engine_cost"]["gmm_2d_wall_seconds"] = wall

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    tmp = args.out / f"toy{suffix}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out / f"toy{suffix}.json")
    plot(report, args.out / f"toy{suffix}.png")
    print(json.dumps({k: report[k] for k in ("engine_cost",)}, indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("bimodal-1d", "w1", "W1 to π* (1D)"),
        ("bimodal-1d", "high_mode_mass", "high-mode mass (1D)"),
        ("gmm-2d", "mmd", "MMD to π* (2D GMM)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
        else:
            ax.axhline(report[task]["noise_floor"][key], color="k", ls="--", label="noise floor")
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


if __name__ == "__main__":
    main()
