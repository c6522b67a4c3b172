"""The `dts` command: steer a diffusers Stable Diffusion model toward a reward from the shell.

`dts generate` runs one prompt and writes the images, a grid, a JSON run record and a reward-against-NFE plot.
`dts batch` runs a prompt file, sharded across processes by accelerate (`accelerate launch -m dts_diffusers.cli batch`
or `torchrun -m dts_diffusers.cli batch`); every prompt is seeded by its index, so sharding never changes a result.
With no `--model` both use the bundled tiny digits model and the `digit-classifier` reward, offline on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

DEFAULT_DIGIT = 7
DEFAULT_REWARD_FOR_BUNDLED = "digit-classifier"
DTYPES = ("float32", "float16", "bfloat16")
# a later run(b) continues the same sampler exactly
ANYTIME_METHODS = ("dts", "dts*", "dts-paper", "dts*-paper", "best-of-n")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "dts-diffusers")
# written into every folder `dts generate` / `dts batch` produce; --overwrite replaces only a folder that holds it
RUN_MARKER = ".dts-run"


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# -------------------------------------------------------------------------------------------------------------------
# arguments
# -------------------------------------------------------------------------------------------------------------------
def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `generate` and `batch`."""
    from dts_diffusers.methods import METHODS

    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist, or --overwrite)")
    parser.add_argument(
        "--model",
        default=None,
        help="diffusers SD/SDXL folder or hub id (default: the bundled tiny digits model, offline)",
    )
    parser.add_argument(
        "--reward",
        default=None,
        help=f"registered reward name (default with the bundled model: {DEFAULT_REWARD_FOR_BUNDLED})",
    )
    parser.add_argument("--digit", type=int, default=None, help="target digit for the digit-classifier reward")
    parser.add_argument("--lam", type=float, default=1.0, help="λ of the target p(x)·exp(λ·reward(x)); 0 = base model")
    parser.add_argument("--nfe-budget", type=int, default=None, help="guided denoising steps per prompt")
    parser.add_argument("--mode", choices=("sample", "search"), default="sample", help="sample (DTS) or search (DTS*)")
    parser.add_argument("--method", choices=METHODS, default="dts", help="the tree or a baseline at equal NFE")
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the method's sampler, e.g. max_backtracks=2 (dfs) or local_search_steps=2 (bfs, dfs; "
        "loads the reward with gradients); repeatable",
    )
    parser.add_argument("--num-images", type=int, default=4, help="images drawn per prompt")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per rollout")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--branch-every", type=int, default=None, help="branch the tree every this many steps")
    parser.add_argument(
        "--widening",
        choices=("default", "paper"),
        default="default",
        help="the tree's progressive widening per level: default keeps the method's own; paper is the paper's "
        "uniform c = 2, α = 0.8 (what dts-paper and dts*-paper use)",
    )
    parser.add_argument("--rollout-batch-size", type=int, default=16, help="rollouts denoised together")
    parser.add_argument("--seed", type=int, default=0, help="base seed (batch: prompt i uses seed + i)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing --out folder that an earlier dts run wrote (it holds {RUN_MARKER}); "
        "any other non-empty folder is refused",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dts", description="Diffusion Tree Sampling / Search for diffusers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="one prompt: images, grid, JSON record, reward-vs-NFE plot")
    generate.add_argument("--prompt", default=None, help="text prompt (default with the bundled model: the digit's)")
    generate.add_argument(
        "--checkpoints", type=int, default=6, help="points on the reward-vs-NFE curve (the budget halved each time)"
    )
    _add_run_arguments(generate)
    batch = commands.add_parser("batch", help="a prompt file, sharded across accelerate/torchrun processes")
    batch.add_argument(
        "--prompts", required=True, type=Path, help='one prompt per line, or JSON lines {"prompt": …, "digit": …}'
    )
    _add_run_arguments(batch)
    return parser


# -------------------------------------------------------------------------------------------------------------------
# model, reward, defaults
# -------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")
    return device


def resolve_dtype(dtype: str | None, device):
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _looks_like_path(model: str) -> bool:
    """Hub ids are `owner/name`; anything else that does not exist is a missing local folder."""
    return model.startswith((".", "/", "~")) or model.count("/") != 1


def pipeline_class_for(model: str):
    """DTSXLPipeline when the model_index names an SDXL pipeline, DTSPipeline otherwise."""
    from diffusers import DiffusionPipeline

    from dts_diffusers import DTSPipeline, DTSXLPipeline

    config = DiffusionPipeline.load_config(model)
    return DTSXLPipeline if "XL" in config.get("_class_name", "") else DTSPipeline


def resolve_model(model: str | None) -> str:
    """The bundled model's folder, a checked local folder, or a hub id; says what to download when it is missing."""
    if model is None:
        from dts_diffusers import digits

        return str(digits.bundled_model_path())
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise CLIError(
                f"--model {model}: no model_index.json in this folder; pass a diffusers pipeline folder "
                "(one written by pipe.save_pretrained, or downloaded with `huggingface-cli download <repo> "
                "--local-dir <folder>`)"
            )
        return str(local)
    if _looks_like_path(model):
        raise CLIError(
            f"--model {model}: no such folder. Download a diffusers Stable Diffusion / SDXL repository with "
            f"`huggingface-cli download <repo-id> --local-dir {model}` (e.g. stable-diffusion-v1-5/"
            "stable-diffusion-v1-5), or leave out --model to use the bundled digits model"
        )
    return model


def load_pipeline(model: str, device, dtype):
    """Load a folder or hub id from `resolve_model` as DTSPipeline / DTSXLPipeline."""
    try:
        pipeline_class = pipeline_class_for(model)
        pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise CLIError(
            f"--model {model}: could not load it as a diffusers pipeline ({error}). If it is a hub id and this "
            f"machine is offline, download it elsewhere with `huggingface-cli download {model} --local-dir <folder>` "
            "and pass --model <folder>"
        ) from error
    pipe.set_progress_bar_config(disable=True)  # the CLI draws one bar over the whole run instead
    return pipe.to(device)


def is_bundled(args: argparse.Namespace) -> bool:
    return args.model is None


def reward_name(args: argparse.Namespace) -> str:
    if args.reward is not None:
        return args.reward
    if is_bundled(args):
        return DEFAULT_REWARD_FOR_BUNDLED
    from dts_diffusers.rewards import reward_names

    raise CLIError(f"--reward is required with --model; one of: {', '.join(reward_names())}")


def load_named_reward(name: str, digit: int | None, device, differentiable: bool = False):
    """The registered reward `name`; `digit` goes to the digit classifier (default DEFAULT_DIGIT)."""
    from dts_diffusers.rewards import load_reward

    options = {}
    if name == "digit-classifier":
        options["digit"] = DEFAULT_DIGIT if digit is None else digit
    elif digit is not None:
        raise CLIError(f"--digit only applies to the digit-classifier reward (got --reward {name})")
    try:
        reward = load_reward(name, device=device, **options)
    except (ValueError, OSError, ImportError) as error:  # unknown name, missing weights, missing package
        raise CLIError(f"--reward {name}: {error}") from error
    if differentiable:
        if not reward.supports_gradients:
            raise CLIError(
                f"--method-option local_search_steps needs a reward with gradients; --reward {name} has none"
            )
        reward.differentiable = True
    return reward


def method_options(args: argparse.Namespace) -> dict:
    """`--method-option NAME=VALUE` pairs, values read as JSON (numbers, lists, true) or else kept as text."""
    options = {}
    for pair in args.method_option:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise CLIError(f"--method-option {pair!r}: write NAME=VALUE, e.g. --method-option max_backtracks=2")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    if options:
        from dts_diffusers.pipelines.tree_search import check_method_options

        try:
            check_method_options(args.method, options)
        except (ValueError, TypeError) as error:
            raise CLIError(f"--method-option: {error}") from error
    return options


def needs_gradients(args: argparse.Namespace) -> bool:
    steps = method_options(args).get("local_search_steps", 0)
    return isinstance(steps, int | float) and steps > 0


def default_prompt(args: argparse.Namespace, digit: int | None) -> str:
    if not is_bundled(args):
        raise CLIError("--prompt is required with --model")
    from dts_diffusers import digits

    return digits.digit_prompt(DEFAULT_DIGIT if digit is None else digit)


def check_run_arguments(args: argparse.Namespace) -> None:
    if args.num_images < 1:
        raise CLIError(f"--num-images must be >= 1 (got {args.num_images})")
    if args.lam < 0:
        raise CLIError(f"--lam must be >= 0 (got {args.lam}); --lam 0 samples the base model")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1 (got {args.steps})")
    if args.nfe_budget is not None and args.nfe_budget < 1:
        raise CLIError(f"--nfe-budget must be >= 1 (got {args.nfe_budget})")
    if args.digit is not None and not 0 <= args.digit <= 9:
        raise CLIError(f"--digit must be 0..9 (got {args.digit})")
    check_out_folder(args.out, args.overwrite)


def run_settings(args: argparse.Namespace) -> dict:
    """Steps, guidance and budget with defaults sized so the bundled model finishes in seconds on a CPU.

    The default budget is 16 rollouts; in search mode at least 4 per image asked for, so the images are the best of
    at least 4 times as many leaves (every rollout ends in a new leaf)."""
    steps = args.steps or (20 if is_bundled(args) else 50)
    guidance = args.guidance_scale if args.guidance_scale is not None else (2.0 if is_bundled(args) else 7.5)
    from dts_diffusers.methods import searches

    rollouts = max(16, 4 * args.num_images) if searches(args.method, args.mode) else 16
    budget = args.nfe_budget or rollouts * steps
    if budget < steps:
        raise CLIError(f"--nfe-budget {budget} is below one rollout of --steps {steps}; give at least {steps}")
    return {"steps": steps, "guidance_scale": guidance, "nfe_budget": budget}


def call_options(args: argparse.Namespace, settings: dict) -> dict:
    return {
        "lam": args.lam,
        "mode": args.mode,
        "method": args.method,
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance_scale"],
        "num_images_per_prompt": args.num_images,
        "rollout_batch_size": args.rollout_batch_size,
        "widening": args.widening,
        **({"branch_every": args.branch_every} if args.branch_every is not None else {}),
        **({"method_options": options} if (options := method_options(args)) else {}),
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def jsonable(value):
    """Floats, ints, lists and dicts only: tensors and numpy values become lists and numbers, infinities None."""
    import math

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -------------------------------------------------------------------------------------------------------------------
# running
# -------------------------------------------------------------------------------------------------------------------
def curve_budgets(budget: int, steps: int, points: int) -> list[int]:
    """Budget, budget/2, budget/4, … (at least one rollout each), ascending: where the reward curve is measured."""
    budgets = {budget}
    while len(budgets) < points and (half := min(budgets) // 2) >= steps:
        budgets.add(half)
    return sorted(budgets)


def progress_callback(progress, start_nfe: int):
    """callback_on_step_end that advances `progress` by the NFE the sampler spent since the last batch."""
    seen = start_nfe

    def on_batch(pipe, step, nfe, tensors):
        nonlocal seen
        progress.update(nfe - seen)
        seen = nfe
        return tensors

    return on_batch


def generate_with_curve(pipe, prompt: str, reward, options: dict, budget: int, seed: int, points: int, progress):
    """Run to `budget`, measuring best and mean reward of the drawn images at doubling budgets on the way.

    The anytime methods continue one sampler (`tree=`), so the curve costs nothing extra and the final tree is the one
    a single call would build; SMC-like baselines fix their population by the budget, so each point is a fresh run
    with the same seed.
    """
    import torch

    tree_method = options["method"] in ANYTIME_METHODS
    curve, trees, output, spent = [], None, None, {"nfe": 0, "unet_evals": 0, "reward_calls": 0}
    timings: dict[str, float] = {}
    previous = 0
    for target in curve_budgets(budget, options["num_inference_steps"], points):
        with warnings.catch_warnings():
            if target < budget:  # an early point of the curve may have fewer leaves than images; only the last counts
                warnings.filterwarnings("ignore", message="search asked for", category=UserWarning)
            output = pipe(
                prompt,
                reward=reward,
                nfe_budget=target - previous if tree_method else target,
                tree=trees,
                generator=torch.Generator("cpu").manual_seed(seed),
                callback_on_step_end=progress_callback(progress, trees[0].nfe if trees else 0),
                callback_on_step_end_tensor_inputs=[],
                **options,
            )
        if tree_method:
            trees, previous = output.trees, target
        for key in spent:
            spent[key] += getattr(output, key)
        for key, seconds in output.timings.items():
            timings[key] = timings.get(key, 0.0) + seconds
        stats = output.trees[0].stats()
        rewards = output.rewards.float()
        curve.append(
            {
                "nfe": output.trees[0].nfe,
                "best_reward": stats["best_reward"],
                "mean_reward": float(rewards.mean()),
                "drawn_rewards": rewards.tolist(),
            }
        )
    return output, curve, spent, timings


def save_curve_plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = [point["nfe"] for point in curve]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(nfe, [point["best_reward"] for point in curve], "o-", label="best reward found")
    axis.plot(nfe, [point["mean_reward"] for point in curve], "s--", label="mean reward of drawn images")
    axis.set_xlabel("NFE (guided denoising steps)")
    axis.set_ylabel("reward")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_grid(images: list, path: Path) -> None:
    from diffusers.utils import make_image_grid

    columns = min(len(images), 8)
    rows = -(-len(images) // columns)
    padded = images + [images[0].copy().point(lambda _: 0)] * (rows * columns - len(images))
    make_image_grid(padded, rows=rows, cols=columns).save(path)


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse an --out that must never be replaced: the working directory or one above it, the filesystem root,
    the home folder, a file, or a non-empty folder (with --overwrite: one without the `.dts-run` marker)."""
    fix = "choose an empty or new folder, or delete it yourself"
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise CLIError(f"--out {out} ({resolved}) is {where}; dts never replaces it: {fix}")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder can be determined
        home = None
    if resolved == Path(resolved.anchor) or resolved == home:
        raise CLIError(f"--out {out} ({resolved}) is the filesystem root or your home folder; {fix}")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder; {fix}")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise CLIError(
            f"--out {out} exists and is not empty; {fix} (or pass --overwrite if an earlier dts run wrote it)"
        )
    if not is_run_folder(out):
        raise CLIError(
            f"--out {out} is not empty and was not written by dts (it has no {RUN_MARKER} file), so --overwrite "
            f"will not replace it; {fix}"
        )


def is_run_folder(folder: Path) -> bool:
    marker = folder / RUN_MARKER
    return marker.is_file() and not marker.is_symlink()


def write_run_marker(folder: Path, command: str) -> None:
    text = f"written by `dts {command}` (dts-diffusers); `dts {command} --overwrite` may replace this folder\n"
    (folder / RUN_MARKER).write_text(text)


@contextmanager
def atomic_folder(out: Path, overwrite: bool, command: str = "generate"):
    """Yield a temporary sibling folder; on success it replaces `out` in one rename, on failure it is removed."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_run_marker(staging, command)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, out, overwrite)


def replace_folder(staging: Path, out: Path, overwrite: bool) -> None:
    """Move `staging` to `out`; an existing `out` is replaced only if check_out_folder still allows it."""
    try:
        check_out_folder(out, overwrite)
    except CLIError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CLIError(f"{error} (nothing was written)") from None
    if out.exists():
        retired = out.with_name(f".{out.name}.{os.getpid()}.old")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def write_json(path: Path, record: dict) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a record."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(jsonable(record), indent=2) + "\n")
    temporary.replace(path)


def command_generate(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    check_run_arguments(args)
    if args.checkpoints < 1:
        raise CLIError(f"--checkpoints must be >= 1 (got {args.checkpoints})")
    settings = run_settings(args)
    prompt = args.prompt if args.prompt is not None else default_prompt(args, args.digit)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = resolve_model(args.model)
    name = reward_name(args)
    reward = load_named_reward(name, args.digit, device, needs_gradients(args))
    pipe = load_pipeline(model, device, dtype)
    options = call_options(args, settings)
    budgets = curve_budgets(settings["nfe_budget"], settings["steps"], args.checkpoints)
    steps = settings["steps"]
    total = settings["nfe_budget"] if args.method in ANYTIME_METHODS else sum(b // steps * steps for b in budgets)
    start = time.perf_counter()
    with atomic_folder(args.out, args.overwrite) as staging:
        with tqdm(total=total, unit="NFE", desc=f"{args.method} ({args.mode})", file=sys.stderr) as progress:
            output, curve, spent, timings = generate_with_curve(
                pipe, prompt, reward, options, settings["nfe_budget"], args.seed, args.checkpoints, progress
            )
        image_files = []
        for index, image in enumerate(output.images):
            image_files.append(f"image-{index:02d}.png")
            image.save(staging / image_files[-1])
        save_grid(list(output.images), staging / "grid.png")
        save_curve_plot(curve, staging / "reward_vs_nfe.png", f"{args.method} ({args.mode}) · {prompt}")
        record = {
            "command": "generate",
            "arguments": {**vars(args), "out": str(args.out)},
            "prompt": prompt,
            "model": args.model or "bundled:digits",
            "reward": name,
            "digit": (DEFAULT_DIGIT if args.digit is None else args.digit) if name == "digit-classifier" else None,
            "settings": settings,
            "seed": args.seed,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "rewards": output.rewards.tolist(),
            "nfe": output.trees[0].nfe,
            "nfe_this_run": spent["nfe"],
            "unet_evals": spent["unet_evals"],
            "reward_calls": spent["reward_calls"],
            "tree": output.trees[0].stats(),
            "curve": curve,
            "timings": {**timings, "wall": time.perf_counter() - start},
            "images": image_files,
            "grid": "grid.png",
            "plot": "reward_vs_nfe.png",
            "versions": versions(),
        }
        write_json(staging / "record.json", record)
    return record


# -------------------------------------------------------------------------------------------------------------------
# batch
# -------------------------------------------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[dict]:
    """Plain lines are prompts; lines starting with `{` are JSON objects with "prompt" and optionally "digit"."""
    if not path.is_file():
        raise CLIError(f"--prompts {path}: no such file")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise CLIError(f"--prompts {path}:{number}: invalid JSON ({error.msg})") from error
            if not isinstance(entry.get("prompt"), str):
                raise CLIError(f'--prompts {path}:{number}: a JSON line needs a "prompt" string')
        else:
            entry = {"prompt": line}
        entries.append(entry)
    if not entries:
        raise CLIError(f"--prompts {path} has no prompts")
    return entries


def run_prompt(pipe, entry: dict, index: int, args, settings: dict, reward_for, staging: Path) -> dict:
    """One prompt, seeded by its index: the same record whichever process runs it."""
    import torch

    seed = args.seed + index
    digit = entry.get("digit", args.digit)
    name = reward_name(args)
    output = pipe(
        entry["prompt"],
        reward=reward_for(name, digit),
        nfe_budget=settings["nfe_budget"],
        generator=torch.Generator("cpu").manual_seed(seed),
        **call_options(args, settings),
    )
    image_files = []
    for image_index, image in enumerate(output.images):
        image_files.append(f"images/prompt-{index:05d}-{image_index:02d}.png")
        image.save(staging / image_files[-1])
    return {
        "index": index,
        "prompt": entry["prompt"],
        "digit": digit,
        "reward": name,
        "seed": seed,
        "rewards": output.rewards.tolist(),
        "nfe": output.nfe,
        "unet_evals": output.unet_evals,
        "reward_calls": output.reward_calls,
        "tree": output.trees[0].stats(),
        "timings": output.timings,
        "images": image_files,
    }


def command_batch(args: argparse.Namespace) -> dict | None:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    check_run_arguments(args)
    entries = read_prompts(args.prompts)
    state = PartialState(cpu=args.device == "cpu")
    settings = run_settings(args)
    device = resolve_device(args.device) if args.device is not None else state.device
    dtype = resolve_dtype(args.dtype, device)
    model = resolve_model(args.model)
    name = reward_name(args)
    rewards: dict = {}

    def reward_for(reward: str, digit: int | None):
        if digit not in rewards:
            rewards[digit] = load_named_reward(reward, digit, device, needs_gradients(args))
        return rewards[digit]

    out = args.out.resolve()
    staging = out.with_name(f".{out.name}.partial")
    if state.is_main_process:
        if staging.exists() or staging.is_symlink():
            if not (staging.is_dir() and is_run_folder(staging)):
                raise CLIError(
                    f"{staging} is in the way of the staging folder and dts did not write it; delete it yourself"
                )
            shutil.rmtree(staging)  # left by an interrupted batch
        (staging / "records").mkdir(parents=True)
        (staging / "images").mkdir()
        write_run_marker(staging, "batch")
    state.wait_for_everyone()
    reward_for(name, args.digit)  # fail early on a bad reward, before loading the model
    pipe = load_pipeline(model, device, dtype)
    start = time.perf_counter()
    with state.split_between_processes(list(enumerate(entries))) as shard:
        for index, entry in tqdm(shard, desc=f"dts batch [{state.process_index}]", file=sys.stderr, unit="prompt"):
            record = run_prompt(pipe, entry, index, args, settings, reward_for, staging)
            write_json(staging / "records" / f"prompt-{index:05d}.json", record)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = [json.loads((staging / "records" / f"prompt-{i:05d}.json").read_text()) for i in range(len(entries))]
    summary = {
        "command": "batch",
        "arguments": {**vars(args), "out": str(args.out), "prompts": str(args.prompts)},
        "settings": settings,
        "num_processes": state.num_processes,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(records),
        "mean_reward": sum(sum(r["rewards"]) for r in records) / sum(len(r["rewards"]) for r in records),
        "nfe": sum(r["nfe"] for r in records),
        "unet_evals": sum(r["unet_evals"] for r in records),
        "wall_seconds_main_process": time.perf_counter() - start,
        "records": [{key: r[key] for key in ("index", "prompt", "digit", "seed", "rewards", "nfe")} for r in records],
        "versions": versions(),
    }
    write_json(staging / "summary.json", summary)
    replace_folder(staging, out, args.overwrite)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            record = command_generate(args)
            print(
                f"wrote {args.out}: {len(record['images'])} images, grid.png, record.json, reward_vs_nfe.png "
                f"(nfe {record['nfe']}, best reward {record['tree']['best_reward']:.4g})"
            )
        else:
            summary = command_batch(args)
            if summary is not None:
                print(f"wrote {args.out}: {summary['prompts']} prompt records and summary.json")
    except CLIError as error:
        print(f"dts: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
