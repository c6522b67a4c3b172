"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*).

The engine (`DTS`) knows nothing of diffusers or ComfyUI; the pipelines and rewards are imported lazily so that
`from dts_diffusers import DTS` stays light.
"""

from .engine import DTS

__all__ = ["DTS"]
__version__ = "0.1.0"
