"""Class-conditional sampling of handwritten digits with the bundled tiny Stable Diffusion model.

The base model is prompted with "a handwritten digit" (no class), and the reward is the shipped digit classifier's
log p(digit | x); with λ = 1 the target p(x)·p(digit | x) is the class-conditional distribution of the base model. For
DTS, DTS*, best-of-N, SMC and BFS at equal NFE, several seeds, it measures against NFE:

- judge accuracy: the share of drawn images that the held-out judge classifier (trained on the other half of the
  data, never used for steering) labels as the target digit;
- FID in the judge's feature space: Fréchet distance between Gaussian fits of the judge features of the drawn images
  and of the real digits of that class;
- diversity: mean pairwise distance between the judge features of the drawn images;
- best reward found, and mean reward of the drawn images.

It reports the NFE at which DTS first matches the best sampling baseline's FID at its largest budget, and the NFE at
which DTS* first matches best-of-N's best reward at its largest budget. Writes benchmarks/results/digits.json,
digits.png and digits.md. `--quick` runs tiny budgets (a smoke test, not results).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from dts_diffusers import DTSPipeline, digits
from dts_diffusers.rewards import load_reward

RESULTS = Path(__file__).parent / "results"
PROMPT = "a handwritten digit"
METHODS = {  # label -> (method, mode)
    "DTS": ("dts", "sample"),
    "DTS*": ("dts*", "search"),
    "best-of-N": ("best-of-n", "sample"),
    "SMC": ("smc", "sample"),
    "BFS": ("bfs", "search"),
}
ANYTIME = {"dts", "dts*", "best-of-n"}  # a later run continues the same sampler exactly
SAMPLING_BASELINES = ("best-of-N", "SMC")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) of Gaussian fits, as in FID."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    ridge = 1e-6 * np.eye(a.shape[1])  # fewer samples than feature dimensions leave the covariances singular
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


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


def run_method(pipe, label, digit, seed, budgets, args, reward, judge, real_features) -> list[dict]:
    method, mode = METHODS[label]
    rows, trees, spent = [], None, 0
    for budget in budgets:
        start = time.perf_counter()
        output = pipe(
            PROMPT,
            reward=reward,
            lam=args.lam,
            nfe_budget=budget - spent if method in ANYTIME else budget,
            mode=mode,
            method=method,
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            num_images_per_prompt=args.draws,
            rollout_batch_size=args.batch_size,
            branch_every=args.branch_every,
            generator=torch.Generator("cpu").manual_seed(1000 * seed + list(METHODS).index(label)),
            output_type="pt",
            tree=trees,
        )
        if method in ANYTIME:
            trees, spent = output.trees, budget
        sampler = output.trees[0]
        rows.append(
            {
                "method": label,
                "digit": digit,
                "seed": seed,
                "nfe": sampler.nfe,
                "best_reward": sampler.stats()["best_reward"],
                "mean_reward": float(output.rewards.mean()),
                "seconds": time.perf_counter() - start,
                **evaluate(output.images.float().cpu(), digit, judge, real_features),
            }
        )
        print(
            f"  {label:9s} digit {digit} seed {seed} nfe {sampler.nfe:5d}: acc {rows[-1]['judge_accuracy']:.2f} "
            f"fid {rows[-1]['fid']:8.2f} div {rows[-1]['diversity']:.2f} best r {rows[-1]['best_reward']:.3f} "
            f"({rows[-1]['seconds']:.1f} s)",
            flush=True,
        )
    return rows


def aggregate(rows: list[dict], budgets: list[int]) -> dict:
    """Mean over digits and seeds per (method, budget)."""
    table = {}
    for label in dict.fromkeys(r["method"] for r in rows):
        table[label] = {}
        for index, _ in enumerate(budgets):
            picked = [r for r in rows if r["method"] == label and r["budget_index"] == index]
            if not picked:
                continue
            table[label][index] = {
                key: float(np.mean([r[key] for r in picked]))
                for key in ("nfe", "judge_accuracy", "fid", "diversity", "best_reward", "mean_reward", "seconds")
            }
    return table


def first_budget(curve: dict, key: str, target: float, lower_is_better: bool) -> int | None:
    for point in curve.values():
        if (point[key] <= target) if lower_is_better else (point[key] >= target):
            return int(point["nfe"])
    return None


def claims(table: dict) -> dict:
    """The two headline comparisons, each only when the methods it needs were run."""
    found = {}
    baselines = [label for label in SAMPLING_BASELINES if label in table]
    if "DTS" in table and baselines:
        last = max(table["DTS"])
        best_label = min(baselines, key=lambda label: table[label][last]["fid"])
        target_fid = table[best_label][last]["fid"]
        dts_nfe = first_budget(table["DTS"], "fid", target_fid, lower_is_better=True)
        largest = int(table[best_label][last]["nfe"])
        found["fid"] = {
            "best_baseline": best_label,
            "baseline_nfe": largest,
            "baseline_fid": target_fid,
            "dts_nfe_to_match": dts_nfe,
            "dts_fid_at_largest": table["DTS"][last]["fid"],
            "speedup": largest / dts_nfe if dts_nfe else None,
        }
    if "DTS*" in table and "best-of-N" in table:
        last = max(table["DTS*"])
        target_reward = table["best-of-N"][last]["best_reward"]
        star_nfe = first_budget(table["DTS*"], "best_reward", target_reward, lower_is_better=False)
        largest = int(table["best-of-N"][last]["nfe"])
        found["best_reward"] = {
            "best_of_n_nfe": largest,
            "best_of_n_best_reward": target_reward,
            "dts_star_nfe_to_match": star_nfe,
            "dts_star_best_reward_at_largest": table["DTS*"][last]["best_reward"],
            "speedup": largest / star_nfe if star_nfe else None,
        }
    return found


def markdown(table: dict, budgets: list[int], found: dict, args) -> str:
    shown = sorted({0, len(budgets) // 2, len(budgets) - 1})
    lines = [
        f"Digits {list(args.digits)}, seeds {list(args.seeds)}, {args.steps} steps, λ={args.lam}, {args.draws} images "
        "drawn per run; mean over digits and seeds. FID and diversity in the held-out judge's feature space.",
        "",
        "| method | " + " | ".join(f"NFE {budgets[i]}: acc / FID / div / best r" for i in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for label, curve in table.items():
        cells = []
        for i in shown:
            p = curve[i]
            cells.append(f"{p['judge_accuracy']:.2f} / {p['fid']:.3g} / {p['diversity']:.3g} / {p['best_reward']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if "fid" in found:
        fid = found["fid"]
        matched = (
            f"DTS matches it at NFE {fid['dts_nfe_to_match']} ({fid['speedup']:.1f}× fewer)"
            if fid["dts_nfe_to_match"]
            else f"DTS does not match it within NFE {budgets[-1]} (DTS FID there: {fid['dts_fid_at_largest']:.3g})"
        )
        lines.append(
            f"- Best sampling baseline at NFE {fid['baseline_nfe']}: {fid['best_baseline']} with FID "
            f"{fid['baseline_fid']:.3g}; {matched}."
        )
    if "best_reward" in found:
        reward = found["best_reward"]
        star = (
            f"DTS* matches it at NFE {reward['dts_star_nfe_to_match']} ({reward['speedup']:.1f}× fewer)"
            if reward["dts_star_nfe_to_match"]
            else f"DTS* does not match it within NFE {budgets[-1]} (DTS* best there: "
            f"{reward['dts_star_best_reward_at_largest']:.3f})"
        )
        lines.append(
            f"- Best-of-N's best reward at NFE {reward['best_of_n_nfe']}: {reward['best_of_n_best_reward']:.3f}; "
            f"{star}."
        )
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fid", "FID (judge features) ↓"), ("judge_accuracy", "judge accuracy ↑"), ("diversity", "diversity"),
            ("best_reward", "best reward found ↑")]  # fmt: skip
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for axis, (key, title) in zip(axes, keys, strict=True):
        for label, curve in table.items():
            points = list(curve.values())
            axis.plot([p["nfe"] for p in points], [p[key] for p in points], "o-", label=label, markersize=3)
        axis.set_xscale("log")
        axis.set_xlabel("NFE")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 3, 7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--branch-every", type=int, default=4)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=64, help="images drawn from each sampler for the metrics")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, not results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.digits, args.seeds, args.budgets, args.draws = args.digits[:1], args.seeds[:1], [40, 80], 8
    torch.manual_seed(0)
    pipe = DTSPipeline.from_pretrained(digits.bundled_model_path())
    pipe.set_progress_bar_config(disable=True)
    judge = digits.load_digit_classifier("judge")
    rows, start = [], time.perf_counter()
    for digit in args.digits:
        reward = load_reward("digit-classifier", digit=digit)
        real_features = digits.judge_features(digits.real_digit_images(digit)).double().numpy()
        for seed in args.seeds:
            for label in args.methods:
                for index, row in enumerate(
                    run_method(pipe, label, digit, seed, args.budgets, args, reward, judge, real_features)
                ):
                    rows.append({**row, "budget_index": index})
    table = aggregate(rows, args.budgets)
    found = claims(table)
    report = markdown(table, args.budgets, found, args)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "digits-quick" if args.quick else "digits"
    record = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"prompt": PROMPT},
        "claims": found,
        "mean_over_digits_and_seeds": {label: list(curve.values()) for label, curve in table.items()},
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(report + "\n")
    plot(table, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
