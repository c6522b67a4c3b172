"""diffusers pipelines with Diffusion Tree Sampling: change one import and one class name."""

from .output import DTSPipelineOutput
from .pipeline_dts import DTSPipeline
from .pipeline_dts_flux import DTSFluxPipeline
from .pipeline_dts_sd3 import DTSSD3Pipeline
from .pipeline_dts_xl import DTSXLPipeline

__all__ = ["DTSFluxPipeline", "DTSPipeline", "DTSPipelineOutput", "DTSSD3Pipeline", "DTSXLPipeline"]
