"""Samplers by name: any diffusers scheduler built from a trained model's scheduler config.

A pipeline is trained with one noise schedule (`DDPMNoiseScheduler`'s betas, prediction type, ...); at sampling time
any of these solvers can walk that schedule. `latentddpm sample --scheduler` and `latentddpm evaluate --schedulers`
choose them by name.
"""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from .scheduling_ddpm_noise import DDPMNoiseScheduler

# name -> (scheduler class, config overrides). `variance_type=None` for DPM-Solver: diffusers' DPM-Solver keeps only
# the first 3 channels of a learned-variance output (it was written for pixel-space DeepFloyd IF); without it the
# pipeline hands DPM-Solver the prediction alone.
_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMNoiseScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "variance_type": None}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def make_sampler(name: str, config) -> SchedulerMixin:
    """The sampler `name` with the noise schedule of `config`.

    Args:
        name (`str`): one of `SAMPLER_NAMES`.
        config (`FrozenDict` or `dict`): a scheduler config, e.g. `pipeline.scheduler.config` (same betas, timesteps
            and prediction type as the model was trained with).

    Returns:
        A new diffusers scheduler.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {list(SAMPLER_NAMES)}.")
    scheduler_class, overrides = _SAMPLERS[name]
    return scheduler_class.from_config(config, **overrides)
