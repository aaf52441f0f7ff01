from .samplers import SAMPLER_NAMES, make_sampler
from .scheduling_ddpm_noise import DDPMNoiseScheduler, DDPMNoiseSchedulerOutput

__all__ = ["SAMPLER_NAMES", "DDPMNoiseScheduler", "DDPMNoiseSchedulerOutput", "make_sampler"]
