"""DrawBench: the DTS paper's headline, max reward per prompt against NFE on DrawBench's 200 prompts, on a real model.

For every prompt, method and NFE budget it records the max reward found, the mean reward of the returned images, the
NFE spent, wall time and peak memory, and the scores that held-out judges (`--judges`, never steered on) give the
same images, so reward hacking shows as a steering reward that rises while the judges do not. Anytime methods (the
tree, `dts` / `dts*`, and best-of-N) are grown once through the NFE grid: each budget continues the previous one's
trees with `tree=output.trees`, so one run measures every grid point. The others are rerun at every budget.

Resumable: each finished prompt x method x budget is one JSON line, written with one append and fsync'd, and read
back at start, so a rerun computes only what is missing (an anytime method that stopped midway regrows its tree to
the last finished budget in one call, the same tree, and records only the budgets after it). Sharded: `--shard i/n`,
or accelerate's process index and count under `accelerate launch`, split the prompts by index; each shard appends to
its own file and every process rewrites the report from all of them when it ends (`--report` only rewrites it).

Writes to --out: config.json (the settings a rerun must match), rows-<i>of<n>.jsonl, summary.md (mean max reward per
method and budget with the paper's published points, the returned images' mean, the judges, the NFE at which each
method reaches best-of-N's largest-budget result, cost, and a breakdown by category) and max_reward_vs_nfe.png (log
NFE axis; the paper's points, read off its figure, dashed when the reward is ImageReward).

    python benchmarks/drawbench.py --out benchmarks/results/drawbench_sd15   # SD 1.5, ImageReward, the paper's grid
    accelerate launch --num_processes 8 benchmarks/drawbench.py --out benchmarks/results/drawbench_sd15
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ranking import nfe_to_reach, write_atomically

DATA = Path(__file__).parent / "data" / "drawbench.csv"
CATEGORIES = (
    "Colors", "Conflicting", "Counting", "DALL-E", "Descriptions", "Gary Marcus et al.", "Misspellings", "Positional",
    "Rare Words", "Reddit", "Text",
)  # fmt: skip
MODELS = {  # short names for the paper's model and its successors; any diffusers folder or hub id works too
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
}
PIPELINES = {  # model_index.json's _class_name -> the DTS pipeline for it
    "StableDiffusionPipeline": "DTSPipeline",
    "StableDiffusionXLPipeline": "DTSXLPipeline",
    "StableDiffusion3Pipeline": "DTSSD3Pipeline",
    "DTSPipeline": "DTSPipeline",
    "DTSXLPipeline": "DTSXLPipeline",
    "DTSSD3Pipeline": "DTSSD3Pipeline",
}
# label -> (method, options); "lam" and "mode" go to the pipeline, the rest to method_options. Every method searches
# (returns its best images) except DTS, which samples p·exp(λ·r).
METHODS: dict[str, tuple[str, dict]] = {
    "DTS*": ("dts*", {}),
    "DTS": ("dts", {"mode": "sample"}),
    "best-of-N": ("best-of-n", {}),
    "FK": ("fk", {"lam": 10.0}),  # the paper's FK-steering baseline for search: max potential, λ = 10
    "SMC": ("smc", {}),
    "BFS": ("bfs", {}),
    "SVDD": ("svdd", {}),
}
PAPER_METHODS = ("DTS*", "best-of-N", "FK")
PAPER_BUDGETS = (1000, 2500, 5000, 10000, 25000, 50000, 100000)
# Mean over the 200 prompts of the max ImageReward, SD v1.5, read off the DTS paper's figure (Jain et al. 2025; the
# project's reference notes, ALGORITHM.md). The paper's FK/SMC curve is drawn beside our FK.
PAPER_POINTS = {
    "DTS*": dict(zip(PAPER_BUDGETS, (1.16, 1.31, 1.41, 1.51, 1.61, 1.67, 1.71), strict=True)),
    "best-of-N": dict(zip(PAPER_BUDGETS, (1.14, 1.27, 1.35, 1.42, 1.48, 1.53, 1.565), strict=True)),
    "FK": dict(zip(PAPER_BUDGETS, (1.18, 1.22, 1.32, 1.33, 1.42, 1.50, 1.52), strict=True)),
}
PAPER_LABELS = {"DTS*": "DTS*", "best-of-N": "best-of-N", "FK": "FK/SMC"}
PAPER_REWARD = "image-reward"
ANYTIME = {"dts", "dts*", "dts-paper", "dts*-paper", "best-of-n"}  # tree= continues them exactly
PIPELINE_OPTIONS = ("lam", "mode")
IDENTITY = ("model", "reward", "judges", "steps", "guidance_scale", "lam", "images", "batch_size", "seed", "dtype")
PLOT = "max_reward_vs_nfe.png"


class SetupError(Exception):
    """A setting, file or model that cannot be used; the message says what to do."""


# -------------------------------------------------------------------------------------------------------------------
# prompts and settings
# -------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    index: int  # row of drawbench.csv, from 0
    text: str
    category: str


def load_prompts(path: Path = DATA) -> list[Prompt]:
    """DrawBench's prompts in the order of the published sheet (columns Prompt, Category)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != ["Prompt", "Category"]:
            raise SetupError(f"{path}: expected the columns Prompt,Category (got {reader.fieldnames})")
        return [Prompt(i, row["Prompt"], row["Category"]) for i, row in enumerate(reader)]


def select_prompts(
    prompts: list[Prompt], indices: list[int] | None, categories: list[str] | None, per_category: int | None
) -> list[Prompt]:
    """The prompts to run: given indices, else all; then only `categories`; then the first `per_category` of each."""
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(prompts)]
        if bad:
            raise SetupError(f"--prompt-indices {bad}: DrawBench's prompts are numbered 0..{len(prompts) - 1}")
        prompts = [prompts[i] for i in dict.fromkeys(indices)]
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown:
            raise SetupError(f"--categories {unknown}: DrawBench's categories are {', '.join(CATEGORIES)}")
        prompts = [p for p in prompts if p.category in categories]
    if per_category is not None:
        taken: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            if taken[prompt.category] <= per_category:
                kept.append(prompt)
        prompts = kept
    if not prompts:
        raise SetupError("no prompt left to run: check --prompt-indices, --categories and --per-category")
    return prompts


def parse_spec(spec: str, flag: str) -> tuple[str, str, dict]:
    """'[LABEL=]NAME[:JSON options]' -> (label, name, options); the label defaults to the name."""
    head, brace, text = spec.partition(":{")
    label, _, name = head.rpartition("=")  # a label may hold "=" (β=1), a name does not
    try:
        options = json.loads("{" + text) if brace else {}
    except json.JSONDecodeError as error:
        raise SetupError(f"{flag} {spec!r}: the options after ':' must be a JSON object ({error})") from None
    if not name:
        raise SetupError(f"{flag} {spec!r}: expected [LABEL=]NAME[:JSON options], e.g. 'FK=fk:{{\"lam\": 10}}'")
    return label or name, name, options


def method_specs(labels: list[str], extra: list[str]) -> dict[str, tuple[str, dict]]:
    """`--methods` labels of METHODS, then the `--method LABEL=METHOD[:JSON]` ones (added, or replacing a label)."""
    from dts_diffusers.methods import METHODS as KNOWN

    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise SetupError(f"--methods {unknown}: choose from {', '.join(METHODS)}, or add one with --method")
    specs = {label: METHODS[label] for label in labels}
    for spec in extra:
        label, method, options = parse_spec(spec, "--method")
        if method not in KNOWN:
            raise SetupError(f"--method {spec!r}: unknown method {method!r}; one of {', '.join(KNOWN)}")
        specs[label] = (method, options)
    if not specs:
        raise SetupError("no method to run: pass --methods and/or --method")
    return specs


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 0/4 (got {text!r})")
    return int(match[1]), int(match[2])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


# -------------------------------------------------------------------------------------------------------------------
# the run's record: config.json and the JSON lines
# -------------------------------------------------------------------------------------------------------------------
def check_config(out: Path, config: dict) -> dict:
    """Write `config` to out/config.json, or check it against the one there: results of two settings never mix.

    Methods may be added between runs (an existing label must keep its method and options); budgets and prompts may
    change freely, since every row records its own."""
    path = out / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [key for key in IDENTITY if saved.get(key) != config[key]]
        changed += [
            f"method {label}"
            for label, spec in config["methods"].items()
            if label in saved["methods"] and saved["methods"][label] != spec
        ]
        if changed:
            details = "; ".join(
                f"{key}: {saved.get(key)!r} there, {config[key]!r} now" if key in IDENTITY else key for key in changed
            )
            raise SetupError(
                f"{out} holds results of other settings ({details}); rerun with the same settings to resume, or "
                "pass another --out"
            )
        config = {
            **config,
            "methods": {**saved["methods"], **config["methods"]},
            "label": config.get("label") or saved.get("label"),  # a resumed run keeps the first run's note
        }
    write_atomically(path, json.dumps(config, indent=2) + "\n")
    return config


def row_key(row: dict) -> tuple[int, str, int]:
    return row["prompt_index"], row["method"], row["budget"]


def read_rows(out: Path) -> list[dict]:
    """Every finished row of every shard; a line cut short by a crash is skipped (and recomputed)."""
    rows, seen = [], set()
    for path in sorted(out.glob("rows-*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{number} is not a whole JSON line (a run cut short); recomputing it")
                continue
            if row_key(row) not in seen:
                seen.add(row_key(row))
                rows.append(row)
    return rows


class RowWriter:
    """Appends one row per line with a single write and fsync, so a crash loses at most the row being written."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read() != b"\n":
                    self._write(b"\n")  # end a line a crash cut short, so the next row starts on its own line

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def __call__(self, row: dict) -> None:
        self._write((json.dumps(row) + "\n").encode())


# -------------------------------------------------------------------------------------------------------------------
# models and rewards
# -------------------------------------------------------------------------------------------------------------------
def download_hint(repo_id: str) -> str:
    return (
        f"get it on a machine that is online with `hf download {repo_id} --local-dir <folder>` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id} --local-dir <folder>`; gated repositories need their licence accepted "
        f"at https://huggingface.co/{repo_id} and `hf auth login`) and pass --model <folder>"
    )


def model_source(model: str) -> str:
    """A short name's hub id, a local folder (checked for its model_index.json), or a hub id."""
    model = MODELS.get(model, model)
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise SetupError(
                f"--model {model}: no model_index.json in this folder; pass a diffusers pipeline folder, e.g. one "
                f"written by `hf download {MODELS['sd15']} --local-dir {model}`"
            )
        return str(local)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SetupError(
            f"--model {model}: no such folder, and not a hub id (owner/name); {download_hint(MODELS['sd15'])}"
        )
    return model


def pipeline_class(source: str) -> type:
    """The DTS pipeline for the model's model_index.json `_class_name` (read from the folder, the hub or its cache)."""
    from diffusers import DiffusionPipeline

    import dts_diffusers

    try:
        config = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as error:
        raise SetupError(
            f"--model {source}: could not read its model_index.json ({error}); {download_hint(source)}"
        ) from None
    name = config.get("_class_name", "")
    if name not in PIPELINES:
        raise SetupError(
            f"--model {source}: its model_index.json names {name!r}; this benchmark runs "
            f"{', '.join(sorted({k for k in PIPELINES if not k.startswith('DTS')}))}"
        )
    return getattr(dts_diffusers, PIPELINES[name])


def load_pipeline(cls: type, source: str, device: torch.device, dtype: torch.dtype):
    """`cls` (from `pipeline_class`) loaded from `source` on `device`, with DDIM (the paper's sampler, η = 1) where
    the scheduler has no stochastic step: set once here, not swapped (with a warning) on every call."""
    from diffusers import DDIMScheduler

    from dts_diffusers import DTSSD3Pipeline
    from dts_diffusers.schedulers import stochastic_kind

    try:
        pipe = cls.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise SetupError(f"--model {source}: could not load its weights ({error}); {download_hint(source)}") from None
    if cls is not DTSSD3Pipeline and stochastic_kind(pipe.scheduler) is None:
        config = dict(pipe.scheduler.config)
        pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_scorer(spec: str, flag: str, device: torch.device):
    """A registered reward by name with its loader options, e.g. 'image-reward' or
    'clip:{"pretrained_model_name_or_path": "/models/clip"}'; missing weights fail here, before any model runs."""
    from dts_diffusers.rewards import load_reward

    _, name, options = parse_spec(spec, flag)
    try:
        return load_reward(name, device=device, **options)
    except (OSError, ImportError, ValueError, TypeError) as error:
        raise SetupError(f"{flag} {spec!r}: {error}") from None


# -------------------------------------------------------------------------------------------------------------------
# measuring
# -------------------------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every pipeline call shares."""

    pipe: object
    reward: object
    judges: dict
    device: torch.device
    steps: int | None
    guidance_scale: float | None
    lam: float
    images: int
    batch_size: int
    seed: int
    shard: str
    save_images: Path | None = None
    calls: int = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak CUDA memory allocated since the last reset; None on a CPU (a process-wide RSS peak says nothing of one
    method)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def call_pipeline(bench: Bench, prompt: Prompt, method: str, options: dict, budget: int, tree: list | None):
    """One pipeline call with its public keyword arguments (method_options only when a spec has extra options);
    returns the output and its wall seconds."""
    extra = {key: value for key, value in options.items() if key not in PIPELINE_OPTIONS}
    generator = None if tree is not None else torch.Generator("cpu").manual_seed(bench.seed * 1_000_003 + prompt.index)
    synchronize(bench.device)
    start = time.perf_counter()
    output = bench.pipe(
        prompt.text,
        reward=bench.reward,
        lam=options.get("lam", bench.lam),
        nfe_budget=budget,
        mode=options.get("mode", "search"),
        method=method,
        num_images_per_prompt=bench.images,
        generator=generator,
        tree=tree,
        num_inference_steps=bench.steps,
        guidance_scale=bench.guidance_scale,
        rollout_batch_size=bench.batch_size,
        output_type="pt",
        **({"method_options": extra} if extra else {}),
    )
    synchronize(bench.device)
    bench.calls += 1
    return output, time.perf_counter() - start


def judge_scores(bench: Bench, prompt: Prompt, images: torch.Tensor) -> dict:
    """Each judge's max and mean over the returned images."""
    scores = {}
    for label, judge in bench.judges.items():
        values = judge(images.float(), [prompt.text] * len(images)).float().cpu()
        scores[label] = {"max": float(values.max()), "mean": float(values.mean())}
    return scores


def save_best_image(bench: Bench, prompt: Prompt, label: str, budget: int, output) -> None:
    from PIL import Image

    best = output.images[int(output.rewards.argmax())].float().clamp(0, 1).mul(255).round().byte()
    name = f"{prompt.index:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', label)}-{budget}.png"
    Image.fromarray(best.permute(1, 2, 0).cpu().numpy()).save(bench.save_images / name)


def make_row(
    bench: Bench, prompt: Prompt, label: str, method: str, budget: int, output, seconds: float, call_seconds: float
) -> dict:
    sampler = output.trees[0]
    start = time.perf_counter()
    judges = judge_scores(bench, prompt, output.images)
    judge_seconds = time.perf_counter() - start
    if bench.save_images is not None:
        save_best_image(bench, prompt, label, budget, output)
    return {
        "prompt_index": prompt.index,
        "category": prompt.category,
        "prompt": prompt.text,
        "method": label,
        "sampler": method,
        "budget": budget,
        "nfe": int(sampler.nfe),
        "max_reward": float(sampler.stats()["best_reward"]),
        "mean_reward": float(output.rewards.mean()),
        "rewards": [round(float(r), 6) for r in output.rewards],
        "judges": judges,
        "seconds": seconds,  # anytime methods: every call that grew this tree to `budget`
        "call_seconds": call_seconds,
        "judge_seconds": judge_seconds,
        "peak_memory_bytes": peak_memory(bench.device),
        "distinct_samples": output.distinct_samples[0] if output.distinct_samples else None,
        "nsfw_flagged": sum(map(bool, output.nsfw_content_detected or [])),
        "num_inference_steps": sampler.built_for["num_inference_steps"],
        "guidance_scale": sampler.built_for["guidance_scale"],
        "seed": bench.seed,
        "shard": bench.shard,
        "finished_at": time.time(),
    }


def log_row(row: dict) -> None:
    judges = " ".join(f"{name} {score['max']:.3f}" for name, score in row["judges"].items())
    print(
        f"[{row['shard']}] prompt {row['prompt_index']:3d} {row['method']:10s} NFE {row['nfe']:6d}: max "
        f"{row['max_reward']:.3f} mean {row['mean_reward']:.3f} {judges} ({row['seconds']:.1f} s)",
        flush=True,
    )


def run_anytime(
    bench: Bench, prompt: Prompt, label: str, spec: tuple, budgets: list[int], done: set, emit: Callable
) -> None:
    """Grow one tree through the budgets, recording each budget not done yet. A finished prefix is regrown in one call
    (the tree of run(a) then run(b - a) is the tree of run(b)) and not recorded again."""
    method, options = spec
    todo = [b for b in budgets if (prompt.index, label, b) not in done]
    if not todo:
        return
    reset_peak(bench.device)
    trees, granted, elapsed = None, 0, 0.0
    finished_prefix = [b for b in budgets if b < todo[0]]
    if finished_prefix:
        output, seconds = call_pipeline(bench, prompt, method, options, finished_prefix[-1], None)
        trees, granted, elapsed = output.trees, finished_prefix[-1], seconds
    for budget in (b for b in budgets if todo[0] <= b <= todo[-1]):
        output, seconds = call_pipeline(bench, prompt, method, options, budget - granted, trees)
        trees, granted, elapsed = output.trees, budget, elapsed + seconds
        if (prompt.index, label, budget) not in done:
            emit(make_row(bench, prompt, label, method, budget, output, elapsed, seconds))


def run_each(
    bench: Bench, prompt: Prompt, label: str, spec: tuple, budgets: list[int], done: set, emit: Callable
) -> None:
    """A fresh run at every budget not done yet (the particle methods size their population to the budget)."""
    method, options = spec
    for budget in budgets:
        if (prompt.index, label, budget) in done:
            continue
        reset_peak(bench.device)
        output, seconds = call_pipeline(bench, prompt, method, options, budget, None)
        emit(make_row(bench, prompt, label, method, budget, output, seconds, seconds))


def run_shard(
    bench: Bench, prompts: list[Prompt], methods: dict, budgets: list[int], done: set, emit: Callable
) -> None:
    for prompt in prompts:
        for label, spec in methods.items():
            run = run_anytime if spec[0] in ANYTIME else run_each
            run(bench, prompt, label, spec, budgets, done, emit)


# -------------------------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------------------------
def comparable(rows: list[dict]) -> dict[int, list[dict]]:
    """Rows by budget, each budget keeping only the prompts every method that ran at it has finished, so the means of
    a run still in progress compare methods on the same prompts."""
    by_budget: dict[int, list[dict]] = {}
    for row in rows:
        by_budget.setdefault(row["budget"], []).append(row)
    kept = {}
    for budget, group in sorted(by_budget.items()):
        methods = {row["method"] for row in group}
        prompts = [{row["prompt_index"] for row in group if row["method"] == m} for m in methods]
        common = set.intersection(*prompts)
        kept[budget] = [row for row in group if row["prompt_index"] in common]
    return kept


def mean_se(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return float(array.mean()), se


def summarize(rows: list[dict]) -> dict:
    """{method: {budget: means over the comparable prompts}}, methods in first-seen order."""
    table: dict = {}
    for budget, group in comparable(rows).items():
        for label in dict.fromkeys(row["method"] for row in group):
            picked = [row for row in group if row["method"] == label]
            peaks = [row["peak_memory_bytes"] for row in picked if row["peak_memory_bytes"] is not None]
            judges = {
                name: {key: float(np.mean([row["judges"][name][key] for row in picked])) for key in ("max", "mean")}
                for name in picked[0]["judges"]
            }
            max_reward, max_se = mean_se([row["max_reward"] for row in picked])
            table.setdefault(label, {})[budget] = {
                "prompts": len(picked),
                "max_reward": max_reward,
                "max_reward_se": max_se,
                "mean_reward": float(np.mean([row["mean_reward"] for row in picked])),
                "nfe": float(np.mean([row["nfe"] for row in picked])),
                "seconds": float(np.mean([row["seconds"] for row in picked])),
                "peak_memory_bytes": max(peaks) if peaks else None,
                "judges": judges,
            }
    return table


def reach_table(table: dict, reference: str = "best-of-N") -> dict:
    """Per method, the NFE at which its mean max reward reaches the reference's at the reference's largest budget."""
    if reference not in table:
        return {}
    largest = max(table[reference])
    target = table[reference][largest]["max_reward"]
    found = {}
    for label, curve in table.items():
        rewards = {b: p["max_reward"] for b, p in curve.items()}
        budget, interpolated = nfe_to_reach(rewards, target, lower_is_better=False)
        found[label] = {
            "reference_budget": largest,
            "target": target,
            "first_budget": budget,
            "interpolated_nfe": interpolated,
            "speedup": largest / interpolated if interpolated else None,
        }
    return found


def category_table(rows: list[dict], budget: int, key: Callable[[dict], float]) -> dict:
    """{category: {method: (mean of key, prompts)}} at `budget`, over the comparable prompts."""
    out: dict = {}
    for row in comparable(rows).get(budget, []):
        out.setdefault(row["category"], {}).setdefault(row["method"], []).append(key(row))
    return {
        category: {label: (float(np.mean(values)), len(values)) for label, values in methods.items()}
        for category, methods in sorted(out.items(), key=lambda item: CATEGORIES.index(item[0]))
    }


def markdown_grid(table: dict, value: Callable[[dict], str], paper: bool = False) -> list[str]:
    """One row per method, one column per budget; `paper` adds the paper's rows (and its budgets as columns)."""
    budgets = sorted({b for curve in table.values() for b in curve} | (set(PAPER_BUDGETS) if paper else set()))
    lines = ["| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for label, curve in table.items():
        lines.append(f"| {label} | " + " | ".join(value(curve[b]) if b in curve else "" for b in budgets) + " |")
    if paper:
        for label in PAPER_METHODS:
            cells = [f"{PAPER_POINTS[label][b]:g}" if b in PAPER_POINTS[label] else "" for b in budgets]
            lines.append(f"| paper: {PAPER_LABELS[label]} | " + " | ".join(cells) + " |")
    return lines


def memory_text(value: int | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / 2**30:.2f} GiB"


def steering_reward_is_the_papers(config: dict) -> bool:
    return parse_spec(config["reward"], "--reward")[1] == PAPER_REWARD


def header_lines(rows: list[dict], config: dict, table: dict) -> list[str]:
    label = f" ({config['label']})" if config.get("label") else ""
    judges = ", ".join(f"`{j}`" for j in config["judges"]) or "none"
    steps = sorted({row["num_inference_steps"] for row in rows})
    guidance = sorted({row["guidance_scale"] for row in rows})
    methods = "; ".join(
        f"{name} = `{method}` {json.dumps(options) if options else ''}".rstrip()
        for name, (method, options) in config["methods"].items()
        if name in table
    )
    return [
        f"# DrawBench: max reward against NFE{label}",
        "",
        f"Model `{config['model']}` ({config['dtype']}), steering reward `{config['reward']}`, held-out judges "
        f"{judges}; {steps} steps, guidance {guidance}, λ = {config['lam']} unless a method sets its own, "
        f"{config['images']} images returned per run, rollout batch {config['batch_size']}, seed {config['seed']}; "
        f"{len({row['prompt_index'] for row in rows})} of DrawBench's 200 prompts. Means over the prompts every "
        "method has finished at that budget (n in the cost table).",
        "",
        f"Methods: {methods}.",
        "",
    ]


def reach_lines(table: dict) -> list[str]:
    reach = reach_table(table)
    if not reach:
        return []
    first = next(iter(reach.values()))
    lines = [
        f"## NFE to reach best-of-N's mean max reward at NFE {first['reference_budget']} ({first['target']:.3f})",
        "",
        "| method | first budget reaching it | NFE, interpolated in log NFE | fewer NFE than best-of-N |",
        "|---|---|---|---|",
    ]
    for label, found in reach.items():
        cells = ["not reached", "", ""]
        if found["first_budget"]:
            cells = [str(found["first_budget"]), f"{found['interpolated_nfe']:.0f}", f"{found['speedup']:.1f}×"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def category_lines(rows: list[dict], budget: int, title: str, key: Callable[[dict], float]) -> list[str]:
    breakdown = category_table(rows, budget, key)
    methods = list(dict.fromkeys(label for cells in breakdown.values() for label in cells))
    lines = [
        f"## By category at NFE {budget}: {title}, mean (prompts)",
        "",
        "| category | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for category, cells in breakdown.items():
        values = [f"{cells[m][0]:.3f} ({cells[m][1]})" if m in cells else "" for m in methods]
        lines.append(f"| {category} | " + " | ".join(values) + " |")
    return [*lines, ""]


def markdown(rows: list[dict], config: dict) -> str:
    table = summarize(rows)
    paper = steering_reward_is_the_papers(config)
    lines = header_lines(rows, config, table)
    lines += [
        "## Max reward found per prompt (mean ± s.e. over prompts)",
        "",
        *markdown_grid(table, lambda p: f"{p['max_reward']:.3f} ± {p['max_reward_se']:.3f}", paper),
        "",
    ]
    if paper:
        lines += ["Paper rows: SD v1.5 + ImageReward on all 200 prompts, read off the DTS paper's figure.", ""]
    lines += [
        "## Mean reward of the returned images",
        "",
        *markdown_grid(table, lambda p: f"{p['mean_reward']:.3f}"),
        "",
    ]
    for judge in config["judges"]:
        lines += [
            f"## Held-out judge `{judge}` (never steered on): best / mean score of the returned images",
            "",
            *markdown_grid(table, lambda p, j=judge: f"{p['judges'][j]['max']:.3f} / {p['judges'][j]['mean']:.3f}"),
            "",
        ]
    lines += reach_lines(table)
    lines += [
        "## Cost per prompt: prompts n / mean NFE spent / wall seconds (anytime methods: every call up to that "
        "budget) / peak memory",
        "",
        *markdown_grid(
            table,
            lambda p: f"{p['prompts']} / {p['nfe']:.0f} / {p['seconds']:.1f} s / {memory_text(p['peak_memory_bytes'])}",
        ),
        "",
    ]
    largest = max(b for curve in table.values() for b in curve)
    lines += category_lines(rows, largest, "max reward", lambda row: row["max_reward"])
    for judge in config["judges"]:
        lines += category_lines(
            rows, largest, f"judge `{judge}` (best returned)", lambda r, j=judge: r["judges"][j]["max"]
        )
    return "\n".join(lines)


def nfe_label(nfe: int) -> str:
    return f"{nfe / 1000:g}k" if nfe >= 1000 else str(nfe)


def plot(rows: list[dict], config: dict, path: Path) -> None:
    """Max reward (the paper's figure), the returned images' mean, and each judge, against NFE on a log axis."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(rows)
    paper = steering_reward_is_the_papers(config)
    panels = [("max reward found (mean over prompts)", lambda p: p["max_reward"], lambda p: p["max_reward_se"])]
    panels.append(("mean reward of the returned images", lambda p: p["mean_reward"], None))
    panels += [
        (f"judge {j}: best returned image", lambda p, j=j: p["judges"][j]["max"], None) for j in config["judges"]
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys([*table, *PAPER_METHODS]))}
    ours = {b for curve in table.values() for b in curve}
    for axis, (title, value, error) in zip(axes[0], panels, strict=True):
        for label, curve in table.items():
            budgets = sorted(curve)
            axis.errorbar(
                budgets, [value(curve[b]) for b in budgets], yerr=[error(curve[b]) for b in budgets] if error else None,
                fmt="o-", markersize=3, capsize=2, color=colors[label], label=label,
            )  # fmt: skip
        if paper and axis is axes[0][0]:
            for label in PAPER_METHODS:
                points = PAPER_POINTS[label]
                axis.plot(list(points), list(points.values()), "s--", markersize=4, markerfacecolor="none",
                          color=colors[label], alpha=0.7, label=f"paper: {PAPER_LABELS[label]}")  # fmt: skip
        axis.set_xscale("log")
        ticks = sorted(ours | (set(PAPER_BUDGETS) if paper and axis is axes[0][0] else set()))
        axis.set_xticks(ticks, [nfe_label(b) for b in ticks], fontsize=7)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("NFE per prompt")
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(parse_spec(config["reward"], "--reward")[1])
    axes[0][0].legend(fontsize=7)
    note = f" — {config['label']}" if config.get("label") else ""
    figure.suptitle(f"DrawBench, {config['model']}{note}", fontsize=9)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


def write_report(out: Path) -> str:
    config = json.loads((out / "config.json").read_text())
    rows = read_rows(out)
    if not rows:
        raise SetupError(f"{out} holds no finished rows yet; nothing to report")
    report = markdown(rows, config)
    write_atomically(out / "summary.md", report + "\n")
    plot(rows, config, out / PLOT)
    return report


# -------------------------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="sd15", help=f"a diffusers folder, a hub id, or {', '.join(MODELS)} (default sd15)"
    )
    p.add_argument(
        "--reward",
        default=PAPER_REWARD,
        metavar="NAME[:JSON]",
        help="the steering reward: a registered name, with loader options as JSON (default image-reward)",
    )
    p.add_argument(
        "--judges",
        nargs="*",
        default=["pickscore", "clip"],
        metavar="[LABEL=]NAME[:JSON]",
        help="held-out rewards that only score the returned images (default pickscore clip; none: --judges)",
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=list(PAPER_METHODS),
        metavar="LABEL",
        help=f"from {', '.join(METHODS)} (default: the paper's figure, {' '.join(PAPER_METHODS)})",
    )
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:JSON]",
        help="add or replace a method, e.g. 'DTS*-paper=dts*-paper' or 'FK=fk:{\"lam\": 1}'",
    )
    p.add_argument("--budgets", nargs="+", type=positive_int, default=list(PAPER_BUDGETS), help="NFE grid per prompt")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's, SD 50)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's, SD 7.5)")
    p.add_argument("--lam", type=float, default=1.0, help="λ of every method without its own (default 1)")
    p.add_argument("--images", type=positive_int, default=4, help="images returned per run (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rollouts denoised together (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-indices", nargs="+", type=int, metavar="I", help="run only these prompts (0..199)")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="run only these categories")
    p.add_argument("--per-category", type=positive_int, metavar="N", help="run only the first N prompts per category")
    p.add_argument("--prompts-file", type=Path, default=DATA)
    p.add_argument("--device", help="default: accelerate's device for this process (cuda if there is one)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default float16 on CUDA, else float32")
    p.add_argument("--shard", type=parse_shard, metavar="I/N", help="run prompt I, I+N, ... (default: accelerate's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "drawbench")
    p.add_argument("--label", help="a note for the summary's title and the plot, e.g. what kind of run this is")
    p.add_argument("--save-images", action="store_true", help="save each run's best returned image under out/images")
    p.add_argument("--report", action="store_true", help="rewrite summary.md and the plot from the rows; run nothing")
    return p


def resolve_process(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(shard index, shard count, device): --shard and --device, else accelerate's process index, count and device."""
    if args.shard is not None:
        index, count = args.shard
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return index, count, device
    from accelerate import PartialState

    # without CUDA, torchrun / accelerate launch ranks need gloo on the CPU, or each one runs alone as 0/1
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, torch.device(args.device) if args.device else state.device


def run(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.report:
        print(write_report(args.out))
        return
    prompts = select_prompts(load_prompts(args.prompts_file), args.prompt_indices, args.categories, args.per_category)
    methods = method_specs(args.methods, args.method)
    budgets = sorted(set(args.budgets))
    index, count, device = resolve_process(args)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    model = model_source(args.model)
    judge_specs = {parse_spec(spec, "--judges")[0]: spec for spec in args.judges}
    args.out.mkdir(parents=True, exist_ok=True)
    check_config(
        args.out,
        {
            "model": model, "reward": args.reward, "judges": judge_specs, "steps": args.steps,
            "guidance_scale": args.guidance, "lam": args.lam, "images": args.images, "batch_size": args.batch_size,
            "seed": args.seed, "dtype": dtype, "methods": {label: list(spec) for label, spec in methods.items()},
            "label": args.label, "machine": {"python": platform.python_version(), "torch": torch.__version__},
        },
    )  # fmt: skip
    done = {row_key(row) for row in read_rows(args.out)}
    mine = prompts[index::count]
    left = sum((p.index, label, b) not in done for p in mine for label in methods for b in budgets)
    print(f"[{index}/{count}] {len(mine)} prompts x {len(methods)} methods x {len(budgets)} budgets: {left} to run")
    if left:
        cls = pipeline_class(model)  # the model's kind and the rewards' weights are checked before the model loads
        reward = load_scorer(args.reward, "--reward", device)
        judges = {label: load_scorer(spec, "--judges", device) for label, spec in judge_specs.items()}
        bench = Bench(
            pipe=load_pipeline(cls, model, device, getattr(torch, dtype)), reward=reward, judges=judges, device=device,
            steps=args.steps, guidance_scale=args.guidance, lam=args.lam, images=args.images,
            batch_size=args.batch_size, seed=args.seed, shard=f"{index}/{count}",
            save_images=args.out / "images" if args.save_images else None,
        )  # fmt: skip
        if bench.save_images is not None:
            bench.save_images.mkdir(exist_ok=True)
        writer = RowWriter(args.out / f"rows-{index}of{count}.jsonl")

        def emit(row: dict) -> None:
            writer(row)
            log_row(row)

        run_shard(bench, mine, methods, budgets, done, emit)
        print(f"[{index}/{count}] {bench.calls} pipeline calls")
    print(write_report(args.out))


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except SetupError as error:
        raise SystemExit(f"drawbench: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
