"""Engine cost: what the tree itself spends (selection, expansion, backup, the latent store) as it grows.

A zero-cost chain (the prior returns zeros, the transition returns its input and the same as x̂_0, the reward is
uniform noise) leaves nothing to time but the engine. Measured side by side in one run:

- bookkeeping seconds per iteration (one rollout) near 10^4, 10^5 and 10^6 nodes (`--nodes`), for the default DTS
  and, with `--methods`, other presets: each size is a tree of its own, all grown first, then measured in
  interleaved rounds (every tree runs `--round-nfe` NFE per round), so a slow period of the machine spreads over all
  sizes; the median round is reported, with the node counts before and after measuring;
- `sample(1000)` on the default tree near 10^5 nodes (median of interleaved repeats);
- the transition calls a replay makes: `sample(64)` on a tree whose latent budget holds 64 latents of the 10^4-node
  tree, at batch sizes 16 and 64 (calls per level, rows per call);
- the latent store's peak while it grows: SD-sized latents (4×64×64 float32, 64 KiB) in batches of 16, the most
  torch held during each `put` (its profiler's allocation events) against the bytes stored then plus one page.

Writes benchmarks/results/engine_cost/engine_cost.{json,md,png}; `--quick` runs small sizes (a smoke test).
`bookkeeping_by_size` is also what `benchmarks/toy.py`'s engine-cost task runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ranking import write_atomically

from dts_diffusers.methods import build_sampler
from dts_diffusers.tree import PAGE_BYTES, LatentStore, TreeArrays

RESULTS = Path(__file__).parent / "results" / "engine_cost"
NUM_STEPS, BRANCH_LEVELS = 10, [10, 8, 6, 4, 2]
NODES = (10_000, 100_000, 1_000_000)
QUICK_NODES = (2_000, 20_000)


def prior(n: int, generators: list) -> torch.Tensor:
    return torch.zeros(n, 2)


def transition(x: torch.Tensor, level: int, generators: list, return_x0: bool = False):
    return (x, x) if return_x0 else x


def reward(x0: torch.Tensor) -> torch.Tensor:
    return torch.rand(len(x0))


def zero_cost_tree(method: str = "dts", transition=transition, **options):
    """A tree over the zero-cost chain (10 steps, a node level every 2)."""
    return build_sampler(method, prior, transition, reward, NUM_STEPS, branch_levels=BRANCH_LEVELS, seed=0, **options)


def grow(dts, nodes: int):
    """Grow `dts` until it holds at least `nodes` finished nodes (a node costs at least one NFE: little overshoot)."""
    while (have := dts.stats()["nodes"]) < nodes:
        dts.run(max(2_000, nodes - have))
    return dts


def trees_by_size(method: str, sizes: list[int]) -> dict[int, object]:
    """One tree per size, each grown from a copy of the one before."""
    trees, dts = {}, zero_cost_tree(method)
    for size in sorted(sizes):
        trees[size] = grow(dts, size)
        dts = copy.deepcopy(dts)
    return trees


def bookkeeping_round(dts, nfe: int) -> float:
    """Bookkeeping seconds per iteration over `nfe` more NFE of `dts`."""
    before_t, before_i = dts.timings.bookkeeping, dts.iterations
    dts.run(nfe)
    return (dts.timings.bookkeeping - before_t) / max(dts.iterations - before_i, 1)


def measure_interleaved(trees: dict, nfe: int, rounds: int) -> dict:
    """Per tree: the median bookkeeping seconds per iteration over `rounds` rounds, every tree once per round."""
    start = {key: dts.stats()["nodes"] for key, dts in trees.items()}
    seconds = {key: [] for key in trees}
    for _ in range(rounds):
        for key, dts in trees.items():
            seconds[key].append(bookkeeping_round(dts, nfe))
    return {
        key: {
            "seconds_per_iteration": float(np.median(seconds[key])),
            "rounds": seconds[key],
            "nodes_measured": [start[key], trees[key].stats()["nodes"]],
        }
        for key in trees
    }


def bookkeeping_by_size(node_targets, method: str = "dts", nfe: int = 2_000, rounds: int = 5) -> dict:
    """Bookkeeping seconds per iteration of `method` near each node count (the keys benchmarks/toy.py reports)."""
    start = time.perf_counter()
    measured = measure_interleaved(trees_by_size(method, list(node_targets)), nfe, rounds)
    out: dict = {}
    for target, entry in measured.items():
        out[f"seconds_per_iteration_at_{target}_nodes"] = entry["seconds_per_iteration"]
        out[f"nodes_measured_near_{target}"] = entry["nodes_measured"]
        per_iteration = entry["seconds_per_iteration"]
        print(f"engine cost ({method}): {per_iteration:.2e} s/iteration near {target} nodes", flush=True)
    out["tree_wall_seconds"] = time.perf_counter() - start
    return out


def sample_seconds(dts, n: int, repeats: int) -> float:
    """Median seconds of `dts.sample(n)`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dts.sample(n)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def replay_calls(nodes: int, draws: int = 64) -> dict:
    """Transition calls of `sample(draws)` on a tree whose store holds `draws` latents, at two batch sizes."""
    out = {}
    for batch_size in (16, 64):
        calls = []

        def counting(x, level, generators, return_x0=False, calls=calls):
            calls.append((level, len(x)))
            return transition(x, level, generators, return_x0)

        dts = grow(zero_cost_tree(transition=counting, batch_size=batch_size, latent_budget_bytes=draws * 8), nodes)
        calls.clear()
        replayed = dts.replayed_nfe
        dts.sample(draws)
        per_level = {level: sum(1 for lv, _ in calls if lv == level) for level, _ in calls}
        out[f"batch_size_{batch_size}"] = {
            "nodes": dts.stats()["nodes"],
            "replayed_nfe": dts.replayed_nfe - replayed,
            "transition_calls": len(calls),
            "max_calls_per_level": max(per_level.values(), default=0),
            "max_rows_per_call": max((rows for _, rows in calls), default=0),
            "levels_replayed": len(per_level),
        }
    return out


def store_peak(latents: int, shape=(4, 64, 64), batch: int = 16) -> dict:
    """The most bytes torch held during each put, against the bytes stored after it plus one page."""
    from torch.profiler import ProfilerActivity, profile

    tree = TreeArrays(root_level=2)
    for _ in range(latents):
        tree.add_node(0, 1, seed=0, is_draw_child=True)
    store = LatentStore(torch.device("cpu"), None)
    rows = torch.randn(batch, *shape)
    worst, held = -math.inf, 0
    for first in range(1, latents + 1, batch):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            store.put(tree, list(range(first, first + batch)), rows)
        live, peak = held, held
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        worst = max(worst, peak - store.bytes)
        held = store.allocated_bytes
    return {
        "latent_bytes": rows[0].numel() * rows.element_size(),
        "stored_bytes": store.bytes,
        "allocated_bytes": store.allocated_bytes,
        "page_bytes": PAGE_BYTES,
        "most_held_above_stored_bytes": int(worst),
    }


def markdown(report: dict) -> str:
    lines = [
        f"Engine cost on a zero-cost chain ({NUM_STEPS} steps, node levels {BRANCH_LEVELS}); {report['machine']}; "
        f"{report['rounds']} interleaved rounds of {report['round_nfe']} NFE per tree (median).",
        "",
        "| method | nodes (measured) | bookkeeping ms / iteration | × the smallest tree |",
        "|---|---|---|---|",
    ]
    for method, sizes in report["bookkeeping"].items():
        base = min(sizes, key=int)
        for entry in sizes.values():
            low, high = entry["nodes_measured"]
            ratio = entry["seconds_per_iteration"] / sizes[base]["seconds_per_iteration"]
            lines.append(f"| {method} | {low:,}–{high:,} | {entry['seconds_per_iteration'] * 1e3:.3f} | {ratio:.2f} |")
    sample = report["sample"]
    lines += [
        "",
        f"- `sample({sample['n']})` at {sample['nodes']:,} nodes: {sample['seconds'] * 1e3:.1f} ms "
        f"(median of {sample['repeats']})",
    ]
    for key, entry in report["replay"].items():
        lines.append(
            f"- replay, `sample(64)` with {key.replace('_', ' ')} on {entry['nodes']:,} nodes whose store holds 64 "
            f"latents: {entry['replayed_nfe']} rows replayed in {entry['transition_calls']} transition calls "
            f"(at most {entry['max_calls_per_level']} a level over {entry['levels_replayed']} levels, at most "
            f"{entry['max_rows_per_call']} rows a call)"
        )
    store = report["store"]
    lines.append(
        f"- latent store, {store['stored_bytes'] / 2**20:.0f} MiB of {store['latent_bytes'] // 1024} KiB latents: "
        f"{store['allocated_bytes'] / 2**20:.0f} MiB allocated; at most "
        f"{store['most_held_above_stored_bytes'] / 2**20:.1f} MiB held above the stored bytes during a put "
        f"(one page: {store['page_bytes'] / 2**20:.0f} MiB)"
    )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, sizes in report["bookkeeping"].items():
        nodes = [int(size) for size in sizes]
        ax.plot(nodes, [e["seconds_per_iteration"] * 1e3 for e in sizes.values()], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tree nodes")
    ax.set_ylabel("bookkeeping ms per iteration")
    ax.set_title("engine cost on a zero-cost chain", fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", help=f"tree sizes (default {NODES})")
    parser.add_argument("--methods", nargs="+", default=["dts"], help="tree presets to measure (default: dts)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-nfe", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true", help="small trees: a smoke test, not results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nodes = args.nodes or (QUICK_NODES if args.quick else NODES)
    start = time.perf_counter()
    trees = {(method, size): dts for method in args.methods for size, dts in trees_by_size(method, nodes).items()}
    print(f"[{time.perf_counter() - start:5.0f}s] grown: {[(k, t.stats()['nodes']) for k, t in trees.items()]}")
    measured = measure_interleaved(trees, args.round_nfe, args.rounds)
    sample_size = sorted(nodes)[len(nodes) // 2]  # 10^5 by default
    sampled = trees[(args.methods[0], sample_size)]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, one thread",
        "rounds": args.rounds,
        "round_nfe": args.round_nfe,
        "bookkeeping": {
            method: {str(size): measured[(method, size)] for size in sorted(nodes)} for method in args.methods
        },
        "sample": {
            "n": 1000,
            "nodes": sampled.stats()["nodes"],
            "repeats": 9,
            "seconds": sample_seconds(sampled, 1000, 9),
        },
        "replay": replay_calls(min(nodes)),
        "store": store_peak(64 if args.quick else 1024),
        "wall_seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out / "engine_cost.json", json.dumps(report, indent=1))
    write_atomically(args.out / "engine_cost.md", markdown(report))
    plot(report, args.out / "engine_cost.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
