"""Locate and read reward weights on the Hugging Face Hub or on disk, with errors that say what to download and where.

Every loader takes `pretrained_model_name_or_path`: a hub repository id, or a local directory / file holding the same
files. Failures (offline, missing file, gated repository) become one `OSError` naming the repository, the file and the
keyword argument that takes a local path. A file that is there but damaged (truncated, garbage, a pickle holding more
than tensors) becomes a `WeightsFileError` naming the file, what is wrong with it and where to get a good copy.

Weights are read without running code from them: safetensors, or `torch.load(weights_only=True)`. torch's own error
for a refused pickle suggests `weights_only=False`, which would run whatever the file holds, so it is never passed on.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import TypeVar

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

T = TypeVar("T")

_HUB_ERRORS = (OSError, ValueError, EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError)


class WeightsFileError(OSError, ValueError):
    """A reward's weight or config file that exists but cannot be used: damaged, or not the file the reward needs."""


def bad_file_error(path: str, problem: str, *, reward: str, repo_id: str, filename: str, argument: str):
    """The one message for a damaged file: which file, what is wrong, and how to replace it."""
    return WeightsFileError(
        f"The {reward!r} reward cannot use {path!r}: {problem}. Replace it with a good copy of {filename!r} from "
        f"https://huggingface.co/{repo_id} (e.g. `hf download {repo_id} {filename} --force-download`) and pass it, "
        f"or the directory holding it, as `{argument}=`."
    )


def short_cause(error: BaseException) -> str:
    """The error's type and text on one line, unless it advises unsafe loading (torch's does: weights_only=False)."""
    text = " ".join(str(error).split())[:240]
    return type(error).__name__ if not text or "weights_only" in text else f"{type(error).__name__}: {text}"


def read_state_dict(
    path: str | os.PathLike, *, reward: str, repo_id: str, filename: str, argument: str, unwrap: str | None = None
) -> dict[str, torch.Tensor]:
    """Named tensors from a .safetensors file or a torch.save file (read with weights_only=True: no code runs).

    `unwrap` names a key whose dict holds the state dict (HPSv2 publishes `{"state_dict": ...}`).
    """
    path = os.fspath(path)
    safetensors = path.endswith(".safetensors")

    def bad(problem: str) -> WeightsFileError:
        return bad_file_error(path, problem, reward=reward, repo_id=repo_id, filename=filename, argument=argument)

    try:
        state = load_file(path) if safetensors else torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise bad(
                "it holds pickled objects other than tensors, which are refused: unpickling them could run code "
                "from the file"
            ) from None
        raise bad("it is truncated or not a PyTorch checkpoint (torch.save file)") from None
    except Exception as error:  # damaged files raise RuntimeError, KeyError, EOFError, SafetensorError, ...
        kind = "safetensors" if safetensors else "PyTorch checkpoint (torch.save)"
        raise bad(f"it is truncated or not a {kind} file ({short_cause(error)})") from None
    if unwrap is not None and isinstance(state, dict) and isinstance(state.get(unwrap), dict):
        state = state[unwrap]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise bad(f"it holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def read_json_config(
    path: str | os.PathLike,
    *,
    reward: str,
    repo_id: str,
    filename: str,
    argument: str,
    positive_ints: tuple[str, ...] = (),
    positive_numbers: tuple[str, ...] = (),
) -> dict:
    """A JSON object from `path` in which `positive_ints` / `positive_numbers` are present and positive."""
    path = os.fspath(path)

    def bad(problem: str) -> WeightsFileError:
        return bad_file_error(path, problem, reward=reward, repo_id=repo_id, filename=filename, argument=argument)

    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"it is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise bad(f"it holds a JSON {type(config).__name__}, not an object")
    kinds = {**dict.fromkeys(positive_numbers, (int, float)), **dict.fromkeys(positive_ints, int)}
    wrong = {
        key: config.get(key)
        for key, kind in kinds.items()
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool) or not config[key] > 0
    }
    if wrong:
        raise bad(f"{', '.join(wrong)} must be positive numbers (got {wrong})")
    return config


def missing_weights_error(repo_id: str, filename: str, argument: str, reward: str, cause: BaseException) -> OSError:
    """The one error message for weights that cannot be found, so every reward tells the user the same fix."""
    return OSError(
        f"Could not load {filename!r} from the Hugging Face Hub repository {repo_id!r} for the {reward!r} reward "
        f"({type(cause).__name__}: {cause}). Download it (e.g. `hf download {repo_id} {filename}` or from "
        f"https://huggingface.co/{repo_id}) and pass the local directory or file as `{argument}=`, or go online."
    )


def resolve_file(
    repo_or_path: str | os.PathLike,
    filename: str,
    *,
    argument: str,
    reward: str,
    local_files_only: bool = False,
) -> str:
    """Path of `filename` inside a local directory, a local file itself, or the file downloaded from a hub repo."""
    path = os.fspath(repo_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(
            f"{filename!r} is not in the directory {path!r} given as `{argument}=` for the {reward!r} reward; "
            f"put the file there or pass the file itself."
        )
    try:
        return hf_hub_download(repo_id=path, filename=filename, local_files_only=local_files_only)
    except _HUB_ERRORS as err:
        raise missing_weights_error(path, filename, argument, reward, err) from err


def load_pretrained(
    loader: Callable[..., T],
    repo_or_path: str | os.PathLike,
    *,
    filename: str,
    argument: str,
    reward: str,
    repo_id: str,
    local_files_only: bool = False,
    **kwargs,
) -> T:
    """Call a transformers `from_pretrained`, turning its offline/missing-file errors into `missing_weights_error`
    and a damaged file into `WeightsFileError`; `repo_id` is where a good copy comes from."""
    path = os.fspath(repo_or_path)
    local = os.path.isdir(path)
    try:
        return loader(path, local_files_only=local_files_only or local, **kwargs)
    except SafetensorError as err:  # a truncated or garbage model.safetensors, local or in the hub cache
        where = os.path.join(path, filename) if local else f"the downloaded {filename} of {path!r}"
        problem = f"it is truncated or not a safetensors file ({short_cause(err)})"
        source = repo_id if local else path
        raise bad_file_error(
            where, problem, reward=reward, repo_id=source, filename=filename, argument=argument
        ) from None
    except _HUB_ERRORS as err:
        if local:
            raise OSError(
                f"Could not load the {reward!r} reward from the local directory {path!r} given as `{argument}=` "
                f"({short_cause(err)}); it must hold a saved `{filename}` and its config, as "
                f"https://huggingface.co/{repo_id} has them (e.g. `hf download {repo_id} --local-dir {path}`)."
            ) from None
        raise missing_weights_error(path, filename, argument, reward, err) from err
