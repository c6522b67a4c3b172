"""ComfyUI nodes for DTS / DTS*: DTS Reward Loader, DTS Sampler (KSampler-shaped), DTS Sampler (SAMPLER) (for
SamplerCustomAdvanced) and DTS Run Report. `NODE_CLASS_MAPPINGS` works everywhere; `comfy_entrypoint` (V3 schema)
where ComfyUI has `comfy_api.latest`."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
