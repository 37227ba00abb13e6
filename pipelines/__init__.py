"""diffusers pipelines for cascaded diffusion. Each module stands alone and never imports cdm."""

from .pipeline_cdm_base import CDMBasePipeline, CDMBasePipelineOutput
from .pipeline_cdm_cascade import CDMCascadePipeline, CDMCascadePipelineOutput
from .pipeline_sr3 import SR3Pipeline, SR3PipelineOutput, augment_low_res, level_embedding

__all__ = [
    "CDMBasePipeline",
    "CDMBasePipelineOutput",
    "CDMCascadePipeline",
    "CDMCascadePipelineOutput",
    "SR3Pipeline",
    "SR3PipelineOutput",
    "augment_low_res",
    "level_embedding",
]
