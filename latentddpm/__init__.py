"""latentddpm: text-to-image latent diffusion on the Hugging Face stack."""

import logging


class _PilFallbackNotice(logging.Filter):
    """transformers 5 warns, once per process, that `CLIPImageProcessor` falls back to its PIL implementation when
    torchvision is absent; diffusers' IP-Adapter loader, which our pipeline mixes in, imports it. The PIL processor is
    the one latentddpm uses, so the notice names nothing to act on: it is dropped, every other message is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackNotice())

__version__ = "0.1.0"
from .models import ConditionalUNet as ConditionalUNet  # noqa: E402
from .pipelines import LatentDDPMPipeline as LatentDDPMPipeline  # noqa: E402
from .pipelines import LatentDDPMPipelineOutput as LatentDDPMPipelineOutput  # noqa: E402
from .schedulers import DDPMNoiseScheduler as DDPMNoiseScheduler  # noqa: E402
