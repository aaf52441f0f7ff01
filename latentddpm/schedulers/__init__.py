from .scheduling_ddpm_noise import DDPMNoiseScheduler, DDPMNoiseSchedulerOutput

__all__ = ["DDPMNoiseScheduler", "DDPMNoiseSchedulerOutput"]
