"""ComfyUI custom-node entry: this repository cloned (or linked) into ComfyUI/custom_nodes/ loads the DTS nodes.

With the V3 node API (`comfy_api.latest`) the nodes register through `comfy_entrypoint`; older ComfyUI reads the
classic `NODE_CLASS_MAPPINGS`. ComfyUI prefers `NODE_CLASS_MAPPINGS` when a pack defines both, so only one is
defined. A plain clone works without `pip install`: the repository root goes on sys.path for `dts_diffusers`.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("dts_diffusers") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

__all__: list[str] = []
if __package__:  # pytest imports this file without a package when collecting tests below a clone: register nothing
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
    else:
        from .comfy_nodes.v3 import comfy_entrypoint

        __all__ = ["comfy_entrypoint"]
