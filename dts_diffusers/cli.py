"""The `dts` command: steer a diffusers Stable Diffusion model toward a reward from the shell.

`dts generate` runs one prompt, and the base model (λ = 0) at the same budget beside it, and writes the images, a
grid, a side-by-side comparison, a JSON run record and a reward-against-NFE plot. `dts batch` runs a prompt file,
sharded across processes by accelerate (`accelerate launch -m dts_diffusers.cli batch` or `torchrun -m
dts_diffusers.cli batch`); every prompt is seeded by its index, so sharding never changes a result, and every prompt's
folder appears whole or not at all, so an interrupted batch resumes where it stopped. With no `--model` both use the
bundled tiny digits model and the `digit-classifier` reward, offline on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from dts_diffusers.defaults import BUNDLED_MODEL_DIR, STABLE_DIFFUSION, RunDefaults, model_defaults

BUNDLED = model_defaults(BUNDLED_MODEL_DIR)  # the bundled model's own, from its dts_defaults.json
ANY_MODEL = STABLE_DIFFUSION
# model_index.json's _class_name -> the DTS pipeline that loads the folder (its family_defaults: the run defaults)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "DTSPipeline",
    "StableDiffusionXLPipeline": "DTSXLPipeline",
    "StableDiffusion3Pipeline": "DTSSD3Pipeline",
    "FluxPipeline": "DTSFluxPipeline",
}
DIGIT_REWARD = "digit-classifier"
DTYPES = ("float32", "float16", "bfloat16")
# a later run(b) continues the same sampler exactly
ANYTIME_METHODS = ("dts", "dts*", "dts-paper", "dts*-paper", "best-of-n")
# names that need no shell quoting
METHOD_ALIASES = {"dts-star": "dts*", "dts-star-paper": "dts*-paper"}
BASE_METHOD = "best-of-n"  # at λ = 0 its draws are plain samples of the base model, and its best is best-of-N's
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "dts-diffusers")
# written into every folder `dts generate` / `dts batch` produce; --overwrite replaces only a folder that holds it
RUN_MARKER = ".dts-run"
BATCH_SETTINGS = "batch.json"  # what a batch folder was started with: a resumed run must match it
LOCK_FILE = ".dts-lock"
PARTIAL = ".partial"  # suffix of every folder that is still being written
COMPARISON_CELL = 128  # pixels per image in comparison.png at least
COMPARISON_WIDTH = 512
# the loader keywords of a reward's weights and the CLI flags that set them
REWARD_SOURCE_FLAGS = {"pretrained_model_name_or_path": "--reward-model"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def warn(message: str) -> None:
    """One line on stderr, like the errors: the CLI's warnings are for the person at the shell, not for Python."""
    print(f"dts: warning: {message}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------------------------
# arguments
# -------------------------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: …)" for every option, except where the help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "(required" in text:
            return text
        return super()._get_help_string(action)


def method_name(text: str) -> str:
    """`dts-star` for `dts*`, so the method needs no quoting in a shell."""
    return METHOD_ALIASES.get(text, text)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `generate` and `batch`."""
    from dts_diffusers.methods import METHODS

    b, m = BUNDLED, ANY_MODEL
    parser.add_argument("--out", required=True, type=Path, help="output folder (required)")
    parser.add_argument(
        "--model",
        default=None,
        help="a diffusers Stable Diffusion, SDXL, SD 3 or FLUX.1 folder or hub id; a value starting with ./, /, ~ or "
        "naming something on disk is a folder (default: the bundled tiny digits model, offline)",
    )
    parser.add_argument(
        "--reward", default=None, help=f"registered reward name (default: {b.reward} with the bundled model)"
    )
    parser.add_argument(
        "--reward-model",
        default=None,
        metavar="PATH",
        help="the reward's weights: a local folder or file, or a hub id (default: the reward's own hub repository)",
    )
    parser.add_argument(
        "--reward-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the reward's loader, e.g. output=logit (digit-classifier); repeatable (default: none)",
    )
    parser.add_argument(
        "--digit",
        type=int,
        default=None,
        help=f"target digit of the {DIGIT_REWARD} reward (default: the digit the prompt names, else {b.digit}; "
        "batch: for prompts that name none)",
    )
    parser.add_argument("--lam", type=float, default=1.0, help="λ of the target p(x)·exp(λ·reward(x)); 0 = base model")
    parser.add_argument(
        "--nfe-budget",
        type=int,
        default=None,
        help=f"guided denoising steps per prompt (default: {b.rollouts} rollouts of --steps with the bundled model, "
        f"{m.rollouts} with --model; in search mode at least 4 per image)",
    )
    parser.add_argument("--mode", choices=("sample", "search"), default="sample", help="sample (DTS) or search (DTS*)")
    parser.add_argument(
        "--method",
        type=method_name,
        choices=METHODS,
        default="dts",
        metavar="{" + ",".join((*METHODS, *METHOD_ALIASES)) + "}",
        help="the tree or a baseline at equal NFE; dts-star and dts-star-paper are dts* and dts*-paper unquoted",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the method's sampler, e.g. max_backtracks=2 (dfs) or local_search_steps=2 (bfs, dfs; "
        "loads the reward with gradients); repeatable (default: none)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help=f"images drawn per prompt (default: {b.num_images} with the bundled model, {m.num_images} with --model)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps per rollout (default: {b.steps} with the bundled model; with --model the model "
        f"family's, e.g. {m.steps} for Stable Diffusion, or its folder's dts_defaults.json)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default: {b.guidance_scale:g} with the bundled model; with --model "
        f"the model family's, e.g. {m.guidance_scale:g} for Stable Diffusion)",
    )
    parser.add_argument(
        "--branch-every",
        type=int,
        default=None,
        help=f"branch the tree every this many steps (default: {b.branch_every} with the bundled model, "
        f"{m.branch_every} with --model)",
    )
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
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="(default: float16 on cuda, float32 on cpu)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing --out folder that an earlier dts run wrote (it holds {RUN_MARKER}); "
        "any other non-empty folder is refused",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dts", description="Diffusion Tree Sampling / Search for diffusers models.", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        help="one prompt: images, grid, base-vs-steered comparison, JSON record, reward-vs-NFE plot",
        description="Run one prompt steered, and the base model (λ = 0) at the same budget for comparison.",
        formatter_class=HelpFormatter,
    )
    generate.add_argument(
        "--prompt",
        default=None,
        help="text prompt (default with the bundled model: the target digit's, e.g. 'a handwritten digit three')",
    )
    generate.add_argument(
        "--checkpoints", type=int, default=6, help="points on the reward-vs-NFE curve (the budget halved each time)"
    )
    generate.add_argument(
        "--no-base",
        action="store_true",
        help=f"skip the base run ({BASE_METHOD} at λ = 0, the same seed and budget): half the compute, but no "
        "comparison.png, base judge accuracy or reference lines in the plot",
    )
    _add_run_arguments(generate)
    batch = commands.add_parser(
        "batch",
        help="a prompt file, sharded across accelerate/torchrun processes; resumes an interrupted run",
        description="Run a prompt file. Each prompt's folder is written whole or not at all; running the same "
        "command again on the same --out skips the prompts already finished.",
        formatter_class=HelpFormatter,
    )
    batch.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help='one prompt per line, or JSON lines {"prompt": …, "digit": …} (required)',
    )
    _add_run_arguments(batch)
    return parser


# -------------------------------------------------------------------------------------------------------------------
# where models and weights come from: checked before anything loads
# -------------------------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of `repo_id` (without asking the Hub)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def looks_like_path(value: str) -> bool:
    """A value the user meant as a local path: it starts like one, or something of that name is on disk."""
    return value.startswith((".", "/", "~", "\\")) or Path(value).expanduser().exists()


def check_source(value: str, flag: str, download_hint: str) -> bool:
    """Check where `flag value` will be read from before any loader tries, so a missing source fails at once.

    A local path must exist; a hub id must be in the cache when HF_HUB_OFFLINE is set, and the Hub must answer for
    it when it is not cached (one request with a timeout instead of the loaders' retries). Returns whether the
    loader must stay offline (local_files_only)."""
    if looks_like_path(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise CLIError(f"{flag} {value}: no such folder: {path.resolve()}; {download_hint}")
        return False
    if hub_cached(value):
        return hub_offline()
    if hub_offline():
        raise CLIError(
            f"{flag} {value}: not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
            f"{download_hint}, or unset HF_HUB_OFFLINE on a machine that is online"
        )
    probe_hub(value, flag, download_hint)
    return False


def probe_hub(repo_id: str, flag: str, download_hint: str) -> None:
    """One request for the repository's metadata: unreachable or unknown repositories fail here, in seconds."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError as error:
        raise CLIError(
            f"{flag} {repo_id}: no such repository on the Hugging Face Hub (or it is private: log in with "
            f"`hf auth login`), and no such local folder either; {download_hint}"
        ) from error
    except Exception as error:  # connection refused, DNS, timeout, proxy: whatever keeps the Hub out of reach
        raise CLIError(
            f"{flag} {repo_id}: it is not in the Hugging Face cache and the Hub cannot be reached "
            f"({type(error).__name__}: {error}); {download_hint}"
        ) from error


def model_download_hint(model: str) -> str:
    return (
        f"download it on a machine that is online with `hf download {model} --local-dir <folder>` and pass "
        "--model <folder>, or leave out --model to use the bundled digits model"
    )


def resolve_model(model: str | None) -> tuple[str, bool]:
    """(the bundled model's folder, a checked local folder or a hub id; whether to load it offline)."""
    if model is None:
        from dts_diffusers import digits

        return str(digits.bundled_model_path()), False
    if model.startswith("~"):
        model = str(Path(model).expanduser())
    offline = check_source(model, "--model", model_download_hint("<repo-id>" if looks_like_path(model) else model))
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise CLIError(
            f"--model {model}: no model_index.json in this folder; pass a diffusers pipeline folder "
            "(one written by pipe.save_pretrained, or downloaded with `hf download <repo-id> --local-dir <folder>`)"
        )
    return model, offline


def resolve_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")
    return device


def limit_threads(args: argparse.Namespace, device) -> None:
    """One CPU thread for the bundled model unless OMP_NUM_THREADS says otherwise: its 32x32 batches gain nothing from
    more, and on a busy 2-core machine two threads made the default run 155 s instead of 27 s (torch's threads spin
    waiting for a core)."""
    import torch

    if is_bundled(args) and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def resolve_dtype(dtype: str | None, device):
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def dts_pipeline_class(class_name: str | None, model: str):
    """The DTS pipeline for a model_index.json `_class_name` (`PIPELINE_CLASSES`)."""
    import dts_diffusers

    if class_name not in PIPELINE_CLASSES:
        supported = ", ".join(f"{name} ({dts})" for name, dts in PIPELINE_CLASSES.items())
        raise CLIError(
            f"--model {model}: its model_index.json names {class_name or 'no _class_name'}, which no DTS pipeline "
            f"loads; the dts command runs {supported}"
        )
    return getattr(dts_diffusers, PIPELINE_CLASSES[class_name])


def pipeline_class_for(model: str, local_files_only: bool = False):
    """The DTS pipeline for the pipeline class a folder or hub id's model_index.json names."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model, local_files_only=local_files_only)
    return dts_pipeline_class(config.get("_class_name"), model)


def local_model_index(model: str) -> Path | None:
    """model_index.json of a local folder or of a hub snapshot already in the cache, found without asking the Hub
    (a hub id not downloaded yet, or a folder that does not exist, which `resolve_model` reports: None)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if looks_like_path(model):
        path = Path(model).expanduser() / "model_index.json"
        return path if path.is_file() else None
    try:
        cached = try_to_load_from_cache(model, "model_index.json")
    except HFValidationError:  # not a hub id either: check_source says so
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_index(model: str) -> Path | None:
    """`local_model_index`; for a hub id not downloaded yet, that file (and a transformer's config.json) fetched
    from the Hub (a few hundred bytes each, which loading fetches anyway) once the Hub has answered for the id
    (`check_source`: an unreachable Hub or an unknown id fails here, in one request), unless HF_HUB_OFFLINE is set.
    None where the file cannot be had."""
    index = local_model_index(model)
    if index is not None or looks_like_path(model) or hub_offline():
        return index
    from huggingface_hub import hf_hub_download

    check_source(model, "--model", model_download_hint(model))
    try:
        index = Path(hf_hub_download(model, "model_index.json", etag_timeout=10))
    except (OSError, ValueError):  # unreachable, unknown or not a hub id
        return None
    with contextlib.suppress(OSError, ValueError):  # where the family's models differ by it (FLUX.1-schnell)
        hf_hub_download(model, "transformer/config.json", etag_timeout=10)
    return index


def dtype_keyword() -> str:
    """from_pretrained's dtype argument: `dtype` where diffusers has renamed it (diffusers#14205, where `torch_dtype`
    warns that it is deprecated), `torch_dtype` in the releases before."""
    import diffusers.utils

    return "dtype" if hasattr(diffusers.utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(model: str, device, dtype, local_files_only: bool = False):
    """Load a folder or hub id from `resolve_model` with the DTS pipeline of its model_index.json.

    Components the folder was saved without (model_index.json's [null, null], e.g. SD 3 without its T5 encoder) are
    passed as None, which diffusers' from_pretrained needs to be told for a component that is not optional."""
    try:
        pipeline_class = pipeline_class_for(model, local_files_only)
        config = pipeline_class.load_config(model, local_files_only=local_files_only)
        absent = {name: None for name, value in config.items() if not name.startswith("_") and value == [None, None]}
        options = {dtype_keyword(): dtype, "local_files_only": local_files_only}
        pipe = pipeline_class.from_pretrained(model, **options, **absent)
    except (OSError, ValueError) as error:
        if local_files_only:  # a hub id offline: only a cached snapshot was there, and part of it is missing
            raise CLIError(
                f"--model {model}: the Hugging Face cache holds only part of it and HF_HUB_OFFLINE is set, so the "
                f"rest cannot be downloaded ({error}); {model_download_hint(model)}"
            ) from error
        raise CLIError(f"--model {model}: could not load it as a diffusers pipeline ({error})") from error
    pipe.set_progress_bar_config(disable=True)  # the CLI draws one bar over the whole run instead
    return pipe.to(device)


# -------------------------------------------------------------------------------------------------------------------
# defaults, reward, checks
# -------------------------------------------------------------------------------------------------------------------
def is_bundled(args: argparse.Namespace) -> bool:
    return args.model is None


def defaults_for(args: argparse.Namespace) -> RunDefaults:
    """The bundled model's; else the family of the pipeline its model_index.json names (SD, SDXL, SD3, FLUX) with a
    folder's dts_defaults.json, as the pipelines fill them (a hub id's model_index.json is fetched first if need be:
    a FLUX id must not run with Stable Diffusion's 50 steps). Where that file cannot be had: Stable Diffusion's."""
    if is_bundled(args):
        return BUNDLED
    index = model_index(args.model)
    if index is None:
        return ANY_MODEL
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as error:
        raise CLIError(f"--model {args.model}: {index} is not a readable JSON file ({error})") from error
    try:
        family = dts_pipeline_class(class_name, args.model).family_defaults(transformer_config(index.parent))
        return model_defaults(index.parent, family)
    except ValueError as error:  # a broken dts_defaults.json
        raise CLIError(f"--model {args.model}: {error}") from error


def transformer_config(folder: Path) -> dict | None:
    """A pipeline folder's transformer/config.json, where it has one that can be read (FLUX.1-schnell's differs)."""
    try:
        return json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None


def reward_name(args: argparse.Namespace) -> str:
    if args.reward is not None:
        return args.reward
    if is_bundled(args):
        return BUNDLED.reward
    from dts_diffusers.rewards import reward_names

    raise CLIError(f"--reward is required with --model; one of: {', '.join(reward_names())}")


def parse_pairs(pairs: list[str], flag: str) -> dict:
    """NAME=VALUE pairs, values read as JSON (numbers, lists, true) or else kept as text."""
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise CLIError(f"{flag} {pair!r}: write NAME=VALUE, e.g. {flag} max_backtracks=2")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


def reward_flag(keyword: str) -> str:
    """The CLI flag that sets a reward loader's keyword, for messages."""
    return REWARD_SOURCE_FLAGS.get(keyword, f"--reward-option {keyword}=PATH")


def reward_options(args: argparse.Namespace, name: str) -> dict:
    """The reward loader's keywords from --reward-model / --reward-option, each source of weights checked first."""
    from dts_diffusers.rewards import reward_loader

    try:
        loader = reward_loader(name)
    except ValueError as error:
        raise CLIError(f"--reward {name}: {error}") from error
    parameters = inspect.signature(loader).parameters
    options = parse_pairs(args.reward_option, "--reward-option")
    if args.reward_model is not None:
        if "pretrained_model_name_or_path" not in parameters:
            raise CLIError(f"--reward-model: the {name} reward loads no weights; leave --reward-model out")
        options["pretrained_model_name_or_path"] = args.reward_model
    takes = [key for key in parameters if key not in ("device", "dtype", "digit")]
    any_keyword = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values())
    for key in options:
        if key not in takes and not any_keyword:
            raise CLIError(f"--reward-option {key}: the {name} reward takes no option {key}; it takes {takes}")
    offline = False
    for key, parameter in parameters.items():
        source = options.get(key, parameter.default)
        if key.endswith("_name_or_path") and isinstance(source, str):
            hint = f"download the {name} reward's weights and pass them with {reward_flag(key)}"
            offline = check_source(source, reward_flag(key), hint) or offline
    if offline and "local_files_only" in parameters:
        options["local_files_only"] = True
    return options


def load_named_reward(name: str, digit: int | None, device, options: dict, differentiable: bool = False):
    """The registered reward `name` with its loader `options`; `digit` goes to the digit classifier."""
    from dts_diffusers.rewards import load_reward

    options = dict(options)
    if name == DIGIT_REWARD:
        options["digit"] = BUNDLED.digit if digit is None else digit
    elif digit is not None:
        raise CLIError(f"--digit only applies to the {DIGIT_REWARD} reward (got --reward {name})")
    try:
        reward = load_reward(name, device=device, **options)
    except (ValueError, OSError, ImportError) as error:  # unknown name, missing weights, missing package
        message = re.sub(r"`(\w+_name_or_path)=`", lambda match: reward_flag(match.group(1)), str(error))
        raise CLIError(f"--reward {name}: {message}") from error
    if differentiable:
        if not reward.supports_gradients:
            raise CLIError(
                f"--method-option local_search_steps needs a reward with gradients; --reward {name} has none"
            )
        reward.differentiable = True
    return reward


def method_options(args: argparse.Namespace) -> dict:
    """`--method-option NAME=VALUE` pairs (checked against the method's sampler by `tree_options`)."""
    return parse_pairs(args.method_option, "--method-option")


def needs_gradients(args: argparse.Namespace) -> bool:
    steps = method_options(args).get("local_search_steps", 0)
    return isinstance(steps, int | float) and steps > 0


def digits_named(prompt: str) -> set[int]:
    """The digits a prompt names, as words or numerals ("a handwritten digit three", "the number 3")."""
    found = set()
    for match in DIGIT_PATTERN.findall(prompt):
        word = match.lower()
        found.add(int(word) if word.isdigit() else DIGIT_WORDS.index(word))
    return found


def generate_target(args: argparse.Namespace, name: str) -> tuple[str, int | None]:
    """(prompt, digit) of `dts generate`, warning where a digit reward and the prompt disagree."""
    if args.prompt is None:
        if not is_bundled(args):
            raise CLIError("--prompt is required with --model")
        from dts_diffusers import digits

        digit = BUNDLED.digit if args.digit is None else args.digit
        return digits.digit_prompt(digit), digit if name == DIGIT_REWARD else None
    if name != DIGIT_REWARD:
        return args.prompt, None
    named = digits_named(args.prompt)
    if args.digit is not None:
        if named and named != {args.digit}:
            warn(
                f"--prompt {args.prompt!r} names {_digits_text(named)} but --digit is {args.digit}; the reward "
                f"steers toward {args.digit}"
            )
        elif not named:
            warn(f"--prompt {args.prompt!r} names no digit; the reward steers toward --digit {args.digit}")
        return args.prompt, args.digit
    if len(named) > 1:
        raise CLIError(f"--prompt {args.prompt!r} names {_digits_text(named)}; pass --digit to say which to steer to")
    if not named:
        warn(
            f"--prompt {args.prompt!r} names no digit; the {DIGIT_REWARD} reward steers toward {BUNDLED.digit} "
            "(pass --digit to choose)"
        )
        return args.prompt, BUNDLED.digit
    return args.prompt, named.pop()


def _digits_text(named: set[int]) -> str:
    ordered = sorted(named)
    return f"digit {ordered[0]}" if len(ordered) == 1 else "digits " + ", ".join(map(str, ordered))


def check_run_arguments(args: argparse.Namespace) -> None:
    """Every numeric flag checked before anything loads, each error naming the flag and a value that works."""
    positive = {
        "--num-images": args.num_images,
        "--steps": args.steps,
        "--nfe-budget": args.nfe_budget,
        "--rollout-batch-size": args.rollout_batch_size,
        "--branch-every": args.branch_every,
        "--checkpoints": getattr(args, "checkpoints", None),
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be a whole number >= 1 (got {value}); leave it out for the default")
    if not math.isfinite(args.lam) or args.lam < 0:
        raise CLIError(f"--lam must be a finite number >= 0 (got {args.lam}); --lam 0 samples the base model")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise CLIError(f"--guidance-scale must be a finite number (got {args.guidance_scale}), e.g. 7.5")
    if args.digit is not None and not 0 <= args.digit <= 9:
        raise CLIError(f"--digit must be 0..9 (got {args.digit})")


def run_settings(args: argparse.Namespace) -> dict:
    """Steps, guidance, branching, budget and image count: each flag, or the model's RunDefaults.

    In search mode the budget is at least 4 rollouts per image asked for, so the images are the best of at least 4
    times as many leaves (every rollout ends in a new leaf)."""
    from dts_diffusers.methods import searches

    defaults = defaults_for(args)
    steps = args.steps or defaults.steps
    num_images = args.num_images or defaults.num_images
    rollouts = max(defaults.rollouts, 4 * num_images) if searches(args.method, args.mode) else defaults.rollouts
    budget = args.nfe_budget or rollouts * steps
    if budget < steps:
        raise CLIError(f"--nfe-budget {budget} is below one rollout of --steps {steps}; give at least {steps}")
    return {
        "steps": steps,
        "guidance_scale": defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "branch_every": args.branch_every or defaults.branch_every,
        "nfe_budget": budget,
        "num_images": num_images,
    }


def tree_options(args: argparse.Namespace, settings: dict):
    """The run's `TreeOptions`, built once from the flags; a bad `--method-option` fails here, before any load."""
    from dts_diffusers.options import TreeOptions

    options = method_options(args)
    try:
        return TreeOptions(
            lam=args.lam,
            mode=args.mode,
            method=args.method,
            method_options=options,
            branch_every=settings["branch_every"],
            widening=args.widening,
            rollout_batch_size=args.rollout_batch_size,
        )
    except (ValueError, TypeError) as error:
        raise CLIError(f"--method-option: {error}" if options else str(error)) from error


def call_options(args: argparse.Namespace, settings: dict) -> dict:
    """The pipeline call's keywords: the tree options and the run settings."""
    return {
        "tree_options": tree_options(args, settings),
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance_scale"],
        "num_images_per_prompt": settings["num_images"],
    }


def base_options(options: dict) -> dict:
    """The same call at λ = 0 with best-of-N: plain base-model samples at the same budget, steps and seed."""
    base = options["tree_options"].replace(
        lam=0.0, mode="sample", method=BASE_METHOD, method_options={}, widening="default"
    )
    return {**options, "tree_options": base}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def jsonable(value):
    """Floats, ints, lists and dicts only: tensors and numpy values become lists and numbers, infinities None,
    dataclasses (the tree options) dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
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


def curve_cost(method: str, budget: int, steps: int, points: int) -> int:
    """NFE a curve spends: the budget once for anytime methods, every point's whole rollouts for the others."""
    if method in ANYTIME_METHODS:
        return budget
    return sum(b // steps * steps for b in curve_budgets(budget, steps, points))


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

    tree_method = options["tree_options"].method in ANYTIME_METHODS
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


def judge_verdicts(images: list, digit: int) -> list[bool]:
    """Whether the bundled held-out judge (trained on data the reward never saw) reads each image as `digit`."""
    import numpy as np
    import torch

    from dts_diffusers import digits

    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        predicted = digits.load_digit_classifier("judge")(batch).argmax(-1)
    return (predicted == digit).tolist()


def save_comparison(rows: list[tuple[str, list, list[bool] | None]], path: Path) -> None:
    """Labelled blocks of images (base above steered), nearest-neighbour upscaled so each is >= 128 px.

    Under each image a bar says what the held-out judge read: green the target digit, red anything else."""
    from PIL import Image, ImageDraw, ImageFont

    first = rows[0][1][0]
    scale = max(1, -(-COMPARISON_CELL // min(first.size)))
    cell_w, cell_h = first.width * scale, first.height * scale
    gap, bar, label_h = 4, 6, 30
    columns = min(8, max(len(images) for _, images, _ in rows))
    width = max(COMPARISON_WIDTH, columns * (cell_w + gap) + gap)
    heights = [label_h + -(-len(images) // columns) * (cell_h + bar + gap) for _, images, _ in rows]
    canvas = Image.new("RGB", (width, sum(heights) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    top = 0
    for (label, images, verdicts), height in zip(rows, heights, strict=True):
        draw.text((gap, top + 6), label, fill="black", font=font)
        for index, image in enumerate(images):
            x = gap + index % columns * (cell_w + gap)
            y = top + label_h + index // columns * (cell_h + bar + gap)
            canvas.paste(image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
            if verdicts is not None:
                colour = (40, 160, 60) if verdicts[index] else (200, 40, 40)
                draw.rectangle((x, y + cell_h + 1, x + cell_w - 1, y + cell_h + bar - 1), fill=colour)
        top += height
    canvas.save(path)


def save_curve_plot(curve: list[dict], path: Path, title: str, label: str, base_curve: list[dict] | None) -> None:
    """Reward against NFE on a log axis, with best-of-N's best and the base model's mean reward as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = [point["nfe"] for point in curve]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(nfe, [point["best_reward"] for point in curve], "o-", color="C0", label=f"{label}: best reward found")
    axis.plot(nfe, [point["mean_reward"] for point in curve], "s--", color="C0", label=f"{label}: mean of drawn images")
    if base_curve is not None:
        base_nfe = [point["nfe"] for point in base_curve]
        best = [point["best_reward"] for point in base_curve]
        axis.plot(base_nfe, best, "^-", color="C1", label="best-of-N (λ = 0): best reward found")
        axis.axhline(base_curve[-1]["mean_reward"], color="C7", linestyle=":", label="base model (λ = 0): mean")
    axis.set_xscale("log")
    axis.set_xlabel("NFE (guided denoising steps, log scale)")
    axis.set_ylabel("reward")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3, which="both")
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


# -------------------------------------------------------------------------------------------------------------------
# output folders
# -------------------------------------------------------------------------------------------------------------------
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
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=out.parent))
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


# -------------------------------------------------------------------------------------------------------------------
# generate
# -------------------------------------------------------------------------------------------------------------------
def command_generate(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    check_run_arguments(args)
    check_out_folder(args.out, args.overwrite)
    name = reward_name(args)  # flag errors before run_settings, which may ask the Hub for a model's family
    settings = run_settings(args)
    prompt, digit = generate_target(args, name)
    options = call_options(args, settings)
    model, offline = resolve_model(args.model)
    loader_options = reward_options(args, name)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    limit_threads(args, device)
    reward = load_named_reward(name, digit, device, loader_options, needs_gradients(args))
    pipe = load_pipeline(model, device, dtype, offline)
    budget, steps, points = settings["nfe_budget"], settings["steps"], args.checkpoints
    total = curve_cost(args.method, budget, steps, points) + (0 if args.no_base else budget)
    label = f"{args.method} (λ = {args.lam:g})"
    start = time.perf_counter()
    with atomic_folder(args.out, args.overwrite) as staging:
        with tqdm(total=total, unit="NFE", desc=f"{args.method} ({args.mode})", file=sys.stderr) as progress:
            output, curve, spent, timings = generate_with_curve(
                pipe, prompt, reward, options, budget, args.seed, points, progress
            )
            base = None
            if not args.no_base:
                progress.set_description(f"base: {BASE_METHOD} (λ = 0)")
                base = generate_with_curve(
                    pipe, prompt, reward, base_options(options), budget, args.seed, points, progress
                )
        images = list(output.images)
        image_files = [f"image-{index:02d}.png" for index in range(len(images))]
        for image, file in zip(images, image_files, strict=True):
            image.save(staging / file)
        save_grid(images, staging / "grid.png")
        judge = None
        if name == DIGIT_REWARD:
            judge = {"digit": digit, "steered_correct": judge_verdicts(images, digit)}
            judge["steered"] = sum(judge["steered_correct"]) / len(images)
        if base is not None:
            base_images = list(base[0].images)
            if judge is not None:
                judge["base_correct"] = judge_verdicts(base_images, digit)
                judge["base"] = sum(judge["base_correct"]) / len(base_images)
            blocks = [
                ("base model (lam = 0)", "base", base_images),
                (f"{args.method} (lam = {args.lam:g})", "steered", images),
            ]
            save_comparison(
                [
                    (comparison_label(title, judge, key), shown, judge and judge[f"{key}_correct"])
                    for title, key, shown in blocks
                ],
                staging / "comparison.png",
            )
        record = {
            "command": "generate",
            "arguments": {**vars(args), "out": str(args.out)},
            "prompt": prompt,
            "model": args.model or "bundled:digits",
            "reward": name,
            "digit": digit,
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
            "judge_accuracy": judge and {key: judge.get(key) for key in ("digit", "base", "steered")},
            "judge": judge,
            "base": None if base is None else base_record(*base),
            "timings": {**timings, "wall": time.perf_counter() - start},
            "images": image_files,
            "grid": "grid.png",
            "comparison": None if base is None else "comparison.png",
            "plot": "reward_vs_nfe.png",
            "versions": versions(),
        }
        write_json(staging / "record.json", record)  # images and record first: a failing plot loses neither
        try:
            save_curve_plot(curve, staging / "reward_vs_nfe.png", f"{prompt} · {name}", label, base and base[1])
        except Exception as error:  # matplotlib missing or broken: the run's results stand without the plot
            reason = "matplotlib is not installed" if isinstance(error, ImportError) else f"{type(error).__name__}"
            warn(f"skipped reward_vs_nfe.png ({reason}: {error}); pip install matplotlib to get it")
            record["plot"] = None
            write_json(staging / "record.json", record)
    return record


def base_record(output, curve: list[dict], spent: dict, timings: dict) -> dict:
    return {
        "method": BASE_METHOD,
        "lam": 0.0,
        "rewards": output.rewards.tolist(),
        "nfe": output.trees[0].nfe,
        "unet_evals": spent["unet_evals"],
        "best_reward": output.trees[0].stats()["best_reward"],
        "curve": curve,
        "timings": timings,
    }


def comparison_label(title: str, judge: dict | None, key: str) -> str:
    if judge is None or key not in judge:
        return title
    correct = judge[f"{key}_correct"]
    return f"{title}: the judge reads a {judge['digit']} in {sum(correct)} of {len(correct)}"


def generate_summary(args: argparse.Namespace, record: dict) -> str:
    """What the person at the shell reads: files, budget, rewards, and whether the judge sees the steering work."""
    files = ["grid.png", "comparison.png" if record["comparison"] else None, "record.json", record["plot"]]
    lines = [
        f"wrote {args.out}: {len(record['images'])} images, {', '.join(f for f in files if f)}",
        f"  {record['arguments']['method']} (λ = {args.lam:g}), {record['nfe']} NFE: mean reward "
        f"{_mean(record['rewards']):.4g}, best {record['tree']['best_reward']:.4g}",
    ]
    if record["base"] is not None:
        base = record["base"]
        lines.append(
            f"  base model (λ = 0, {BASE_METHOD}, {base['nfe']} NFE): mean reward {_mean(base['rewards']):.4g}, "
            f"best {base['best_reward']:.4g}"
        )
    judge = record["judge_accuracy"]
    if judge is not None:
        base_text = "" if judge["base"] is None else f"base {judge['base']:.0%} -> "
        lines.append(f"  held-out judge reads a {judge['digit']}: {base_text}steered {judge['steered']:.0%}")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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
        entries.append({**entry, "line": number})
    if not entries:
        raise CLIError(f"--prompts {path} has no prompts")
    return entries


def batch_targets(entries: list[dict], args: argparse.Namespace, name: str) -> list[dict]:
    """Each entry's prompt and digit, refusing before any compute a prompt the reward has no target for.

    With the digit reward a prompt's digit is its "digit" field, else the one digit its text names, else --digit;
    a prompt naming none of these ("a cat") or contradicting its field is refused."""
    targets = []
    for entry in entries:
        where = f"--prompts {args.prompts}:{entry['line']}"
        digit = entry.get("digit")
        if name != DIGIT_REWARD:
            if digit is not None:
                raise CLIError(f'{where}: "digit" only applies to the {DIGIT_REWARD} reward (got --reward {name})')
            targets.append({"prompt": entry["prompt"], "digit": None})
            continue
        named = digits_named(entry["prompt"])
        if digit is not None:
            if not isinstance(digit, int) or not 0 <= digit <= 9:
                raise CLIError(f'{where}: "digit" must be a whole number 0..9 (got {digit!r})')
            if named and named != {digit}:
                raise CLIError(f'{where}: the prompt names {_digits_text(named)} but its "digit" is {digit}')
        elif len(named) == 1:
            digit = next(iter(named))
        elif len(named) > 1:
            raise CLIError(f'{where}: the prompt names {_digits_text(named)}; add a "digit" field to say which')
        elif args.digit is not None:
            digit = args.digit
        else:
            raise CLIError(
                f"{where}: the prompt {entry['prompt']!r} names no digit, so the {DIGIT_REWARD} reward has no "
                f'target; write e.g. "a handwritten digit 3", use a JSON line {{"prompt": ..., "digit": 3}}, or pass '
                "--digit for every prompt that names none"
            )
        targets.append({"prompt": entry["prompt"], "digit": digit})
    return targets


def prompt_folder(index: int) -> str:
    return f"prompt-{index:05d}"


def run_prompt(pipe, target: dict, index: int, args, settings: dict, options: dict, reward, out: Path) -> dict:
    """One prompt, seeded by its index, written whole: images and record go to a hidden staging folder that is renamed
    to prompt-NNNNN/ only when complete, so a prompt's folder is finished or absent."""
    import torch

    seed = args.seed + index
    folder = prompt_folder(index)
    staging = out / f".{folder}.{os.getpid()}{PARTIAL}"
    staging.mkdir()
    try:
        output = pipe(
            target["prompt"],
            reward=reward,
            nfe_budget=settings["nfe_budget"],
            generator=torch.Generator("cpu").manual_seed(seed),
            **options,
        )
        image_files = []
        for image_index, image in enumerate(output.images):
            image_files.append(f"{folder}/image-{image_index:02d}.png")
            image.save(staging / Path(image_files[-1]).name)
        record = {
            "index": index,
            "prompt": target["prompt"],
            "digit": target["digit"],
            "reward": reward_name(args),
            "seed": seed,
            "rewards": output.rewards.tolist(),
            "nfe": output.nfe,
            "unet_evals": output.unet_evals,
            "reward_calls": output.reward_calls,
            "tree": output.trees[0].stats(),
            "timings": output.timings,
            "images": image_files,
        }
        write_json(staging / "record.json", record)
        if (out / folder).exists():  # an incomplete folder finished_record() rejected
            shutil.rmtree(out / folder)
        staging.rename(out / folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def finished_record(out: Path, index: int, target: dict, seed: int) -> dict | None:
    """The record of a prompt an earlier run finished, if its folder holds it and every image it lists."""
    path = out / prompt_folder(index) / "record.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (record.get("prompt"), record.get("digit"), record.get("seed")) == (target["prompt"], target["digit"], seed)
    if same and all((out / image).is_file() for image in record.get("images", [])):
        return record
    return None


LOCK_BYTE = 1 << 20  # Windows locks byte ranges, and locked bytes cannot be read: lock one far past the owner line


def lock_exclusively(handle, windows: bool = os.name == "nt") -> None:
    """Lock an open file for this process alone, without waiting; OSError when another process holds it. The OS drops
    the lock when its process dies: flock on POSIX, msvcrt's byte-range lock on Windows (which has no fcntl)."""
    if windows:
        import msvcrt

        handle.seek(LOCK_BYTE)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        finally:
            handle.seek(0)
    else:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


class FolderLock:
    """An exclusive lock on a batch folder: a lock file holding the owner's pid, locked with `lock_exclusively`.

    The OS drops the lock when its process dies, so a lock left by a dead run is taken over at once, while a live
    run's lock is refused with its pid."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            lock_exclusively(self.handle)
        except OSError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise CLIError(
                f"--out {folder} is being written by another dts batch ({owner}); wait for it to finish, stop it, or "
                "choose another --out"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()  # closing drops the lock; the file stays, so no second run can lock a fresh inode


def batch_settings(
    args: argparse.Namespace, settings: dict, options: dict, targets: list[dict], name: str, dtype
) -> dict:
    """Everything a prompt's result depends on: a resumed run must match it exactly (the device count need not)."""
    return jsonable(
        {
            "prompts": targets,
            "model": args.model or "bundled:digits",
            "reward": name,
            "reward_model": args.reward_model,
            "reward_options": parse_pairs(args.reward_option, "--reward-option"),
            "settings": settings,
            "call": options,
            "seed": args.seed,
            "dtype": str(dtype).removeprefix("torch."),
        }
    )


def open_batch_folder(out: Path, run: dict, overwrite: bool) -> FolderLock:
    """Create or reopen `out` under its lock: a fresh folder, the same batch to resume, or (--overwrite) a dts folder
    cleared for a new batch. Staging folders that a killed run left behind are removed."""
    check_out_folder(out, overwrite or is_batch_folder(out))
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        recorded = out / BATCH_SETTINGS
        if recorded.is_file() and not overwrite:
            earlier = json.loads(recorded.read_text())
            if earlier != run:
                differ = sorted(key for key in {*earlier, *run} if earlier.get(key) != run.get(key))
                raise CLIError(
                    f"--out {out} holds a dts batch started with other settings (they differ in: {', '.join(differ)});"
                    " rerun it with the same arguments to resume, pass --overwrite to start afresh, or choose "
                    "another --out"
                )
        else:
            for entry in out.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            write_run_marker(out, "batch")
            write_json(recorded, run)
        for entry in out.glob(f".*{PARTIAL}"):
            shutil.rmtree(entry, ignore_errors=True)
    except BaseException:
        lock.release()
        raise
    return lock


def is_batch_folder(folder: Path) -> bool:
    return is_run_folder(folder) and (folder / BATCH_SETTINGS).is_file()


def on_main_process(state, work):
    """Run `work()` on the main process only; its CLIError reaches every process, so none waits for the others."""
    from accelerate.utils import broadcast_object_list

    result, message = None, None
    if state.is_main_process:
        try:
            result = work()
        except CLIError as error:
            message = str(error)
    [message] = broadcast_object_list([message])
    if message is not None:
        raise CLIError(message)
    return result


def command_batch(args: argparse.Namespace) -> dict | None:
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    check_run_arguments(args)
    name = reward_name(args)
    targets = batch_targets(read_prompts(args.prompts), args, name)
    settings = run_settings(args)
    options = call_options(args, settings)  # the tree options, checked once before anything loads
    model, offline = resolve_model(args.model)
    loader_options = reward_options(args, name)
    # torchrun without CUDA: gloo on the CPU, not a CUDA backend that falls back to a single process per rank
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    device = resolve_device(args.device) if args.device is not None else state.device
    dtype = resolve_dtype(args.dtype, device)
    limit_threads(args, device)
    out = args.out.resolve()
    run = batch_settings(args, settings, options, targets, name, dtype)

    def prepare() -> tuple[FolderLock, int]:
        lock = open_batch_folder(out, run, args.overwrite)
        return lock, sum(finished_record(out, i, t, args.seed + i) is not None for i, t in enumerate(targets))

    lock, resumed = on_main_process(state, prepare) or (None, 0)
    try:
        state.wait_for_everyone()
        rewards: dict = {}

        def reward_for(digit: int | None):
            if digit not in rewards:
                rewards[digit] = load_named_reward(name, digit, device, loader_options, needs_gradients(args))
            return rewards[digit]

        reward_for(targets[0]["digit"])  # fail early on a bad reward, before loading the model
        pipe = load_pipeline(model, device, dtype, offline)
        start = time.perf_counter()
        with state.split_between_processes(list(enumerate(targets))) as shard:
            bar = tqdm(shard, desc=f"dts batch [{state.process_index}]", file=sys.stderr, unit="prompt")
            for index, target in bar:
                if finished_record(out, index, target, args.seed + index) is not None:
                    continue  # an earlier run finished it
                run_prompt(pipe, target, index, args, settings, options, reward_for(target["digit"]), out)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        records = [finished_record(out, i, target, args.seed + i) for i, target in enumerate(targets)]
        missing = [i for i, record in enumerate(records) if record is None]
        if missing:
            raise CLIError(f"prompts {missing} have no complete record in {out}; rerun the same command to finish them")
        summary = {
            "command": "batch",
            "arguments": {**vars(args), "out": str(args.out), "prompts": str(args.prompts)},
            "settings": settings,
            "num_processes": state.num_processes,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "prompts": len(records),
            "resumed_prompts": resumed,
            "mean_reward": sum(sum(r["rewards"]) for r in records) / sum(len(r["rewards"]) for r in records),
            "nfe": sum(r["nfe"] for r in records),
            "unet_evals": sum(r["unet_evals"] for r in records),
            "wall_seconds_main_process": time.perf_counter() - start,
            "records": [
                {key: r[key] for key in ("index", "prompt", "digit", "seed", "rewards", "nfe")} for r in records
            ],
            "versions": versions(),
        }
        write_json(out / "summary.json", summary)
        return summary
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            record = command_generate(args)
            print(generate_summary(args, record))
        else:
            summary = command_batch(args)
            if summary is not None:  # the main process, after summary.json is written
                resumed = (
                    f" ({summary['resumed_prompts']} finished by an earlier run)" if summary["resumed_prompts"] else ""
                )
                print(f"wrote {args.out}: {summary['prompts']} prompt folders{resumed} and summary.json")
    except CLIError as error:
        print(f"dts: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
