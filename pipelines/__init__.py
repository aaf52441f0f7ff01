"""Inference pipelines (installed as `latentddpm.pipelines`)."""

from .model_card import prepare_hub_folder, write_model_card
from .pipeline_latent_ddpm import LatentDDPMPipeline, LatentDDPMPipelineOutput
from .space import write_space

__all__ = ["LatentDDPMPipeline", "LatentDDPMPipelineOutput", "prepare_hub_folder", "write_model_card", "write_space"]
