"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*).

The engine (`DTS`, `build_sampler`) knows nothing of diffusers or ComfyUI. Pipelines, rewards and the
k-diffusion sampler are imported on first use, so `from dts_diffusers import DTS` stays light.
"""

from importlib import import_module

from .dfs import DepthFirstSearch
from .engine import DTS
from .methods import METHODS, build_sampler
from .options import TreeOptions
from .particles import ParticleSearch
from .tree import Widening

__version__ = "0.1.0"

_LAZY = {
    "DTSPipeline": "dts_diffusers.pipelines",
    "DTSXLPipeline": "dts_diffusers.pipelines",
    "DTSSD3Pipeline": "dts_diffusers.pipelines",
    "DTSFluxPipeline": "dts_diffusers.pipelines",
    "DTSPipelineOutput": "dts_diffusers.pipelines",
    "load_reward": "dts_diffusers.rewards",
    "as_reward": "dts_diffusers.rewards",
    "register_reward": "dts_diffusers.rewards",
    "sample_dts": "dts_diffusers.k_sampling",
}

__all__ = ["DTS", "METHODS", "DepthFirstSearch", "ParticleSearch", "TreeOptions", "Widening", "build_sampler", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dts_diffusers' has no attribute {name!r}")
