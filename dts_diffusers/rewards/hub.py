"""Locate reward weights on the Hugging Face Hub or on disk, with errors that say what to download and where.

Every loader takes `pretrained_model_name_or_path`: a hub repository id, or a local directory / file holding the same
files. Failures (offline, missing file, gated repository) become one `OSError` naming the repository, the file and the
keyword argument that takes a local path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

T = TypeVar("T")

_HUB_ERRORS = (OSError, ValueError, EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError)


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
    local_files_only: bool = False,
    **kwargs,
) -> T:
    """Call a transformers `from_pretrained`, turning its offline/missing-file errors into `missing_weights_error`."""
    path = os.fspath(repo_or_path)
    try:
        return loader(path, local_files_only=local_files_only or os.path.isdir(path), **kwargs)
    except _HUB_ERRORS as err:
        if os.path.isdir(path):
            raise OSError(
                f"Could not load the {reward!r} reward from the local directory {path!r} given as `{argument}=` "
                f"({type(err).__name__}: {err}); it must hold a saved `{filename}` and its config."
            ) from err
        raise missing_weights_error(path, filename, argument, reward, err) from err
