"""One set of run defaults per model family, shared by the pipelines and the `dts` command.

A model folder may carry its own in `dts_defaults.json` (the bundled digits model does: its first run has to show
steering at work), so the defaults live with the model and every entry point reads the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

DEFAULTS_FILE = "dts_defaults.json"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-sd-digits"


@dataclass(frozen=True)
class RunDefaults:
    """What a run uses for every option left out."""

    steps: int
    guidance_scale: float
    branch_every: int
    rollouts: int  # the default NFE budget is this many rollouts of `steps`
    num_images: int
    reward: str | None = None
    digit: int | None = None

    @property
    def nfe_budget(self) -> int:
        return self.rollouts * self.steps


STABLE_DIFFUSION = RunDefaults(steps=50, guidance_scale=7.5, branch_every=10, rollouts=16, num_images=4)
STABLE_DIFFUSION_XL = replace(STABLE_DIFFUSION, guidance_scale=5.0)  # diffusers' SDXL default
STABLE_DIFFUSION_3 = replace(STABLE_DIFFUSION, steps=28, guidance_scale=7.0)  # diffusers' SD3 defaults
FLUX = replace(STABLE_DIFFUSION, steps=28, guidance_scale=3.5)  # FluxPipeline's (FLUX.1-dev's) defaults
FLUX_SCHNELL = replace(FLUX, steps=4, guidance_scale=0.0)  # timestep-distilled FLUX.1-schnell: 4 steps, no guidance


def model_defaults(folder: str | Path | None, family: RunDefaults = STABLE_DIFFUSION) -> RunDefaults:
    """`family` with the fields a local model folder's `dts_defaults.json` sets (a hub id or None: `family`)."""
    path = Path(folder) / DEFAULTS_FILE if folder else None
    if path is None or not path.is_file():
        return family
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file of run defaults ({error}); fix or delete it") from error
    known = {f.name for f in fields(RunDefaults)}
    unknown = set(given) - known - {"why"}
    if unknown:
        raise ValueError(f"{path}: unknown run defaults {sorted(unknown)}; known: {sorted(known)}")
    return replace(family, **{k: v for k, v in given.items() if k in known})
