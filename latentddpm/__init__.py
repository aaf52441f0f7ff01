"""latentddpm: text-to-image latent diffusion on the Hugging Face stack."""

__version__ = "0.1.0"
from .models import ConditionalUNet as ConditionalUNet
from .pipelines import LatentDDPMPipeline as LatentDDPMPipeline
from .pipelines import LatentDDPMPipelineOutput as LatentDDPMPipelineOutput
from .schedulers import DDPMNoiseScheduler as DDPMNoiseScheduler
