"""Class-conditional sampling and reward search on handwritten digits with the bundled tiny Stable Diffusion model.

The base model is prompted with "a handwritten digit" (no class). Two tasks, every method at equal NFE, several seeds:

- sampling: the reward is the shipped digit classifier's log p(digit | x); with λ = 1 the target p(x)·p(digit | x) is
  the base model's class-conditional distribution. DTS against best-of-N (importance resampling), SMC and FK-steering,
  measured by judge accuracy (the share of drawn images that the held-out judge classifier, trained on the other half
  of the data and never used for steering, labels as the digit), FID in the judge's feature space against the real
  digits of that class, and diversity (mean pairwise distance of judge features);
- search: the reward is the digit's classifier logit (log p saturates at 0, the logit keeps rising). DTS* against
  best-of-N, BFS (the classical-search paper's best: increasing temperature, max scoring, SSP), SVDD, DFS with
  backtracking, BFS with local search and DAS (without gradients), measured by the best reward found.

It reports the NFE at which DTS first matches the best sampling baseline's FID at its largest budget, and the NFE at
which DTS* first matches best-of-N's best reward at its largest budget. Anytime methods (the tree, best-of-N)
are grown through every budget; the others are rerun at every other budget. Writes benchmarks/results/digits.json,
digits.png and digits.md. `--quick` runs tiny budgets (a smoke test, not results). `--exact-reference N` runs no
method: it writes the FID that M exact π* samples give (`exact_reference`), the scale the methods' FIDs are read on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ranking import nfe_to_reach, parse_sampler, ranking_table, write_atomically
from scipy import linalg

from dts_diffusers import DTSPipeline, digits
from dts_diffusers.rewards import load_reward

RESULTS = Path(__file__).parent / "results"
PROMPT = "a handwritten digit"
TASKS = {  # task -> {label: (method, method_options)}; sampling runs mode="sample", search mode="search"
    "sampling": {
        "DTS": ("dts", {}),
        "best-of-N": ("best-of-n", {}),
        "SMC": ("smc", {}),
        "FK": ("fk", {}),
    },
    "search": {
        "DTS*": ("dts*", {}),
        "best-of-N": ("best-of-n", {}),
        "BFS": ("bfs", {}),
        "SVDD": ("svdd", {}),
        "DFS": ("dfs", {}),
        "BFS + local search": ("bfs", {"local_search_steps": 1, "local_search_step_size": 0.05}),
        "DAS": ("das", {}),
    },
}
REWARD_OUTPUT = {"sampling": "log_prob", "search": "logit"}
ANYTIME = {"dts", "dts*", "best-of-n"}  # a later run continues the same sampler exactly (DFS does not: backtracks
# affordable near the end of one budget differ)
SAMPLING_BASELINES = ("best-of-N", "SMC", "FK")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) of Gaussian fits, as in FID."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    ridge = 1e-6 * np.eye(a.shape[1])  # fewer samples than feature dimensions leave the covariances singular
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def real_digit_features(digit: int) -> np.ndarray:
    """The judge's features of every real image of `digit`: what the FIDs are measured against."""
    return digits.judge_features(digits.real_digit_images(digit)).double().numpy()


def mean_pairwise_distance(features: np.ndarray) -> float:
    distances = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    n = len(features)
    return float(distances.sum() / (n * (n - 1)))


def evaluate(images: torch.Tensor, digit: int, judge, real_features: np.ndarray) -> dict:
    features = digits.judge_features(images).double().numpy()
    with torch.no_grad():
        predicted = judge(images).argmax(-1)
    return {
        "judge_accuracy": float((predicted == digit).float().mean()),
        "fid": frechet_distance(features, real_features),
        "diversity": mean_pairwise_distance(features),
    }


def run_method(pipe, task, label, digit, seed, budgets, args, reward, judge, real_features) -> list[dict]:
    method, options = TASKS[task][label]
    rows, trees, spent = [], None, 0
    for index, budget in enumerate(budgets):
        if method not in ANYTIME and index % 2 != (len(budgets) - 1) % 2:
            continue  # rerun from scratch only at every other budget, always including the largest
        start = time.perf_counter()
        output = pipe(
            PROMPT,
            reward=reward,
            lam=args.lam,
            nfe_budget=budget - spent if method in ANYTIME else budget,
            mode="sample" if task == "sampling" else "search",
            method=method,
            method_options=options or None,
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            num_images_per_prompt=args.draws,
            rollout_batch_size=args.batch_size,
            branch_every=args.branch_every,
            generator=torch.Generator("cpu").manual_seed(1000 * seed + list(TASKS[task]).index(label)),
            output_type="pt",
            tree=trees,
        )
        if method in ANYTIME:
            trees, spent = output.trees, budget
        sampler = output.trees[0]
        row = {
            "task": task,
            "method": label,
            "digit": digit,
            "seed": seed,
            "budget": budget,
            "nfe": sampler.nfe,
            "best_reward": sampler.stats()["best_reward"],
            "mean_reward": float(output.rewards.mean()),
            "seconds": time.perf_counter() - start,
            **evaluate(output.images.float().cpu(), digit, judge, real_features),
        }
        rows.append(row)
        print(
            f"  {task:8s} {label:18s} digit {digit} seed {seed} nfe {row['nfe']:5d}: acc {row['judge_accuracy']:.2f} "
            f"fid {row['fid']:8.2f} div {row['diversity']:.2f} best r {row['best_reward']:.3f} "
            f"({row['seconds']:.1f} s)",
            flush=True,
        )
    return rows


METRICS = ("nfe", "judge_accuracy", "fid", "diversity", "best_reward", "mean_reward", "seconds")


def aggregate(rows: list[dict], task: str) -> dict:
    """Mean over digits and seeds per (method, budget), with the FID's standard error over those runs ("fid_se": a
    256-image FID moves by ±100 between runs, so a gap between means is only read against it):
    {label: {budget: {metric: mean}}}."""
    table: dict = {}
    for row in rows:
        if row["task"] == task:
            table.setdefault(row["method"], {}).setdefault(row["budget"], []).append(row)
    return {
        label: {
            budget: {key: float(np.mean([r[key] for r in picked])) for key in METRICS} | {"fid_se": fid_se(picked)}
            for budget, picked in sorted(curve.items())
        }
        for label, curve in table.items()
    }


def fid_se(runs: list[dict]) -> float:
    fids = [run["fid"] for run in runs]
    return float(np.std(fids, ddof=1) / np.sqrt(len(fids))) if len(fids) > 1 else float("nan")


def nfe_curve(curve: dict, key: str) -> dict:
    """{nfe spent: value} from a method's {budget: metrics}: anytime methods may stop a few NFE short of a budget."""
    return {int(point["nfe"]): point[key] for point in curve.values()}


def claims(sampling: dict, search: dict, largest: int) -> dict:
    """The two headline comparisons, each only when the methods it needs were run."""
    found = {}
    baselines = [label for label in SAMPLING_BASELINES if largest in sampling.get(label, {})]
    if "DTS" in sampling and baselines:
        best_label = min(baselines, key=lambda label: sampling[label][largest]["fid"])
        target_fid = sampling[best_label][largest]["fid"]
        dts_nfe, dts_interpolated = nfe_to_reach(nfe_curve(sampling["DTS"], "fid"), target_fid)
        baseline_nfe = int(sampling[best_label][largest]["nfe"])
        found["fid"] = {
            "best_baseline": best_label,
            "baseline_nfe": baseline_nfe,
            "baseline_fid": target_fid,
            "dts_nfe_to_match": dts_nfe,
            "dts_nfe_interpolated": dts_interpolated,
            "dts_fid_at_largest": sampling["DTS"][largest]["fid"],
            "speedup": baseline_nfe / dts_interpolated if dts_interpolated else None,
        }
    if "DTS*" in search and "best-of-N" in search:
        target_reward = search["best-of-N"][largest]["best_reward"]
        star_nfe, star_interpolated = nfe_to_reach(
            nfe_curve(search["DTS*"], "best_reward"), target_reward, lower_is_better=False
        )
        baseline_nfe = int(search["best-of-N"][largest]["nfe"])
        found["best_reward"] = {
            "best_of_n_nfe": baseline_nfe,
            "best_of_n_best_reward": target_reward,
            "dts_star_nfe_to_match": star_nfe,
            "dts_star_nfe_interpolated": star_interpolated,
            "dts_star_best_reward_at_largest": search["DTS*"][largest]["best_reward"],
            "speedup": baseline_nfe / star_interpolated if star_interpolated else None,
        }
    return found


def markdown(sampling: dict, search: dict, found: dict, args) -> str:
    shown = args.budgets[len(args.budgets) % 2 == 0 :: 2]  # the budgets every method was run at
    lines = [
        f"Digits {list(args.digits)}, seeds {list(args.seeds)}, {args.steps} steps, branch every {args.branch_every}, "
        f"λ={args.lam}, {args.draws} images drawn per run; mean over digits and seeds.",
        "",
        "Sampling (reward log p(digit | x)), ranked by FID in the held-out judge's feature space "
        "(cell: FID ± its standard error over the runs / judge accuracy / diversity):",
        "",
        *ranking_table(
            sampling,
            shown,
            "fid",
            True,
            lambda p: f"{p['fid']:.0f} ± {p['fid_se']:.0f} / {p['judge_accuracy']:.2f} / {p['diversity']:.3g}",
        ),
        "",
        "Search (reward: the digit's logit), ranked by the best reward found (cell: best reward / mean reward / judge "
        "accuracy of the returned images):",
        "",
        *ranking_table(
            search,
            shown,
            "best_reward",
            False,
            lambda p: f"{p['best_reward']:.2f} / {p['mean_reward']:.2f} / {p['judge_accuracy']:.2f}",
        ),
        "",
    ]
    if "DTS*" in search:  # anytime: the tree grows across budgets, so its returned images should only get better
        means = ", ".join(f"{budget}: {point['mean_reward']:.2f}" for budget, point in search["DTS*"].items())
        lines += [f"- DTS*'s mean reward of the returned images by NFE (one growing tree): {means}.", ""]
    if "fid" in found:
        fid = found["fid"]
        matched = (
            f"DTS matches it at about NFE {fid['dts_nfe_interpolated']:.0f} ({fid['speedup']:.1f}× fewer; interpolated "
            f"in log NFE, first reached at the budget {fid['dts_nfe_to_match']})"
            if fid["dts_nfe_to_match"]
            else f"DTS does not match it within NFE {args.budgets[-1]} (DTS FID there: {fid['dts_fid_at_largest']:.3g})"
        )
        lines.append(
            f"- Best sampling baseline at NFE {fid['baseline_nfe']}: {fid['best_baseline']} with FID "
            f"{fid['baseline_fid']:.3g}; {matched}."
        )
    if "best_reward" in found:
        reward = found["best_reward"]
        star = (
            f"DTS* matches it at about NFE {reward['dts_star_nfe_interpolated']:.0f} ({reward['speedup']:.1f}× fewer; "
            f"interpolated in log NFE, first reached at the budget {reward['dts_star_nfe_to_match']})"
            if reward["dts_star_nfe_to_match"]
            else f"DTS* does not match it within NFE {args.budgets[-1]} (DTS* best there: "
            f"{reward['dts_star_best_reward_at_largest']:.3f})"
        )
        lines.append(
            f"- Best-of-N's best reward at NFE {reward['best_of_n_nfe']}: {reward['best_of_n_best_reward']:.3f}; "
            f"{star}."
        )
    return "\n".join(lines)


def plot(sampling: dict, search: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (sampling, "fid", "sampling: FID (judge features) ↓"),
        (sampling, "judge_accuracy", "sampling: judge accuracy ↑"),
        (sampling, "diversity", "sampling: diversity"),
        (search, "best_reward", "search: best logit found ↑"),
        (search, "mean_reward", "search: mean logit of the returned images ↑"),
    ]
    panels = [panel for panel in panels if panel[0]]  # only the tasks that ran
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (table, key, title) in zip(axes[0], panels, strict=True):
        for label, curve in table.items():
            points = list(curve.values())
            axis.plot([p["nfe"] for p in points], [p[key] for p in points], "o-", label=label, markersize=3)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short decade
        axis.set_xlabel("NFE")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    for table in (sampling, search):  # one legend per task, on its first panel
        first = next((axis for axis, panel in zip(axes[0], panels, strict=True) if panel[0] is table), None)
        if first is not None:
            first.legend(fontsize=7)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


EXACT_SIZES = (10, 15, 25, 35, 50, 75, 100, 200)


def exact_reference(pipe, args, repeats: int = 64) -> dict:
    """What an FID is worth in exact π* samples: the FID of `args.draws` images drawn from M exact samples of π*.

    The reward log p(digit | x) is ≤ 0, so accepting a base-model sample with probability exp(λ·r) ≤ 1 samples π*
    exactly (rejection). M accepted samples drawn `args.draws` times (each about draws / M times, as from M equally
    weighted leaves) give the FID of a sampler whose draws rest on M independent exact samples; a method's FID then
    reads as a number of exact samples, and its NFE over that number as its cost per exact sample."""
    base = pipe(
        PROMPT,
        reward=load_reward("digit-classifier", digit=args.digits[0], output="log_prob"),
        nfe_budget=args.exact_reference * args.steps,
        mode="search",  # the n best of n particles: every base-model sample once, in reward order
        method="best-of-n",
        num_inference_steps=args.steps,
        guidance_scale=1.0,
        num_images_per_prompt=args.exact_reference,
        rollout_batch_size=args.batch_size,
        generator=torch.Generator("cpu").manual_seed(12345),
        output_type="pt",
    ).images.float()
    features = digits.judge_features(base).double().numpy()
    rng = np.random.default_rng(0)
    per_digit = {}
    for digit in args.digits:
        reward = load_reward("digit-classifier", digit=digit, output="log_prob")
        with torch.no_grad():
            accept = np.exp(args.lam * reward(base).double().numpy())
        real = real_digit_features(digit)
        fids: dict[int, list[float]] = {}
        for _ in range(repeats):
            pool = features[rng.random(len(accept)) < accept]
            for size in (m for m in EXACT_SIZES if m <= len(pool)):
                chosen = pool[rng.choice(len(pool), size, replace=False)]
                fids.setdefault(size, []).append(frechet_distance(chosen[np.resize(np.arange(size), args.draws)], real))
        per_digit[digit] = {"acceptance": float(accept.mean()), "fid": {m: float(np.mean(v)) for m, v in fids.items()}}
    sizes = [m for m in EXACT_SIZES if all(m in d["fid"] for d in per_digit.values())]
    return {
        "base_samples": args.exact_reference,
        "repeats": repeats,
        "draws": args.draws,
        "fid_by_exact_samples": {m: float(np.mean([d["fid"][m] for d in per_digit.values()])) for m in sizes},
        "per_digit": per_digit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 3, 7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--branch-every", type=int, default=4)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=256, help="images drawn from each sampler for the metrics")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, not results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rewrite the tables and plot of an earlier run's JSON, run nothing"
    )
    parser.add_argument(
        "--exact-reference",
        type=int,
        default=0,
        metavar="N",
        help="instead of the methods: draw N base-model samples and write the FID of M exact π* samples "
        "(digits_exact_reference.json), the scale a method's FID is read on",
    )
    parser.add_argument(
        "--sampler",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:JSON]",
        help="add a sampler to the sampling task (design experiments): 'DTS (β=1)=dts:{\"level_cost_exponent\":1}'",
    )
    args = parser.parse_args()
    TASKS["sampling"].update(map(parse_sampler, args.sampler))
    if args.from_json is not None:
        record = json.loads(args.from_json.read_text())
        settings = argparse.Namespace(**record["settings"])
        sampling, search = aggregate(record["rows"], "sampling"), aggregate(record["rows"], "search")
        report = markdown(sampling, search, claims(sampling, search, settings.budgets[-1]), settings)
        write_atomically(args.out / f"{args.from_json.stem}.md", report + "\n")
        plot(sampling, search, args.out / f"{args.from_json.stem}.png")
        print(report)
        return
    if args.quick:
        args.digits, args.seeds, args.budgets, args.draws = args.digits[:1], args.seeds[:1], [40, 80, 120], 8
    torch.manual_seed(0)
    pipe = DTSPipeline.from_pretrained(digits.bundled_model_path())
    pipe.set_progress_bar_config(disable=True)
    if args.exact_reference:
        reference = exact_reference(pipe, args)
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out / "digits_exact_reference.json", json.dumps(reference, indent=2) + "\n")
        print(json.dumps(reference["fid_by_exact_samples"]))
        return
    judge = digits.load_digit_classifier("judge")  # the methods' runs only: the exact reference reads FIDs alone
    rows, start = [], time.perf_counter()
    for digit in args.digits:
        real_features = real_digit_features(digit)
        for task in args.tasks:
            # differentiable for local search; under the pipeline's no_grad the other methods build no graph
            reward = load_reward("digit-classifier", digit=digit, output=REWARD_OUTPUT[task], differentiable=True)
            for seed in args.seeds:
                for label in TASKS[task]:
                    rows += run_method(pipe, task, label, digit, seed, args.budgets, args, reward, judge, real_features)
    sampling, search = aggregate(rows, "sampling"), aggregate(rows, "search")
    found = claims(sampling, search, args.budgets[-1])
    report = markdown(sampling, search, found, args)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "digits-quick" if args.quick else "digits"
    record = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"prompt": PROMPT},
        "methods": {task: {label: list(spec) for label, spec in specs.items()} for task, specs in TASKS.items()},
        "claims": found,
        "mean_over_digits_and_seeds": {"sampling": sampling, "search": search},
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    write_atomically(args.out / f"{name}.json", json.dumps(record, indent=2) + "\n")
    write_atomically(args.out / f"{name}.md", report + "\n")
    plot(sampling, search, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
