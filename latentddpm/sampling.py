"""Sampling a saved pipeline as `latentddpm sample` does: one code path for that command and `latentddpm serve`, so
that the command shown with each image of the web app draws that image again, bit for bit."""

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from diffusers import SchedulerMixin

from latentddpm.config import ConfigError
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import make_sampler


@dataclass
class SampleSettings:
    """The settings of one `latentddpm sample` run; each field is the command's flag of the same name.

    Args:
        model (`str`): a folder written by `save_pretrained`, or a Hub repo id.
        prompt (`list[str]`): the prompts, one row of the grid each.
        negative_prompt (`str`, *optional*): what guidance steers away from; `""` when `None`.
        steps (`int`): denoising steps.
        guidance (`float`): classifier-free guidance scale; `<= 1` disables guidance.
        seed (`int`): seed of the CPU generator that draws all the noise.
        num_images (`int`): images per prompt (the grid's columns).
        scheduler (`str`, *optional*): one of `SAMPLER_NAMES`; the saved scheduler when `None`.
        height (`int`, *optional*), width (`int`, *optional*): the image size; the U-Net's training size when `None`.
        device (`str`): where the pipeline runs.
        lora (`list[str]`): LoRA adapters to load and activate, each `PATH[:NAME]` (see [`parse_lora`]).
        lora_weight (`list[float]`): the weight of each adapter of `lora`, in order; 1 for all when empty.
    """

    model: str
    prompt: list[str]
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    num_images: int
    scheduler: str | None
    height: int | None
    width: int | None
    device: str
    lora: list[str] = field(default_factory=list)
    lora_weight: list[float] = field(default_factory=list)

    def command(self) -> str:
        """The `latentddpm sample` command line of these settings, quoted for a POSIX shell."""
        argv = ["latentddpm", "sample", "--model", self.model]
        for prompt in self.prompt:
            argv += ["--prompt", prompt]
        if self.negative_prompt is not None:
            argv += ["--negative_prompt", self.negative_prompt]
        argv += ["--steps", str(self.steps), "--guidance", str(self.guidance), "--seed", str(self.seed)]
        argv += ["--num_images", str(self.num_images)]
        for flag, value in [("--scheduler", self.scheduler), ("--height", self.height), ("--width", self.width)]:
            if value is not None:
                argv += [flag, str(value)]
        for spec in self.lora:
            argv += ["--lora", spec]
        for weight in self.lora_weight:
            argv += ["--lora_weight", str(weight)]
        argv += ["--device", self.device]
        return shlex.join(argv)


def parse_lora(spec: str) -> tuple[str, str]:
    """`PATH[:NAME]` -> `(PATH, NAME)`: a LoRA adapter (a folder or Hub repo with `pytorch_lora_weights.safetensors`,
    or a `.safetensors` file) and the name it is loaded under. Without a name, the adapter is named after its folder
    (the file's folder for a file), with characters other than letters, digits and `_` replaced by `_`: peft keeps
    adapters in `nn.ModuleDict`s, whose keys cannot hold a dot.

    Raises:
        `ConfigError`: for an empty path or a name with other characters.
    """
    path, colon, name = spec.rpartition(":")
    if not colon or not name or "/" in name or "\\" in name:
        path = spec
        folder = Path(path).parent if Path(path).suffix == ".safetensors" else Path(path)
        name = re.sub(r"\W", "_", folder.resolve().name)
    if not path or not re.fullmatch(r"\w+", name):
        raise ConfigError(f"LoRA {spec!r}: expected PATH[:NAME] with a NAME of letters, digits and '_'.")
    return path, name


def load_pipeline(
    model: str, device: str, lora: list[str] = (), lora_weight: list[float] = ()
) -> tuple[LatentDDPMPipeline, list[str]]:
    """Load a saved pipeline with its LoRA adapters, all active, and move it to `device`.

    Args:
        model (`str`): a folder written by `save_pretrained`, or a Hub repo id.
        device (`str`): where the pipeline runs.
        lora (`list[str]`): adapters as `PATH[:NAME]` (see [`parse_lora`]), loaded with `load_lora_weights`.
        lora_weight (`list[float]`): one weight per adapter for `set_adapters`; 1 for all when empty.

    Returns:
        The pipeline, and the names of its adapters in the order of `lora`.

    Raises:
        `ConfigError`: before loading anything, for a malformed `lora`, two adapters of one name, or a number of
            weights that is neither 0 nor one per adapter.
    """
    adapters = dict(parse_lora(spec)[::-1] for spec in lora)  # name -> path
    if len(adapters) != len(lora):
        raise ConfigError(f"LoRA adapters {list(lora)} share a name: name each one with PATH:NAME.")
    if lora_weight and len(lora_weight) != len(lora):
        raise ConfigError(f"Got {len(lora_weight)} LoRA weights for {len(lora)} LoRA adapters: give one per adapter.")
    pipe = LatentDDPMPipeline.from_pretrained(model)
    for name, path in adapters.items():
        pipe.load_lora_weights(path, adapter_name=name)
    if adapters:
        pipe.set_adapters(list(adapters), list(lora_weight) or None)
    return pipe.to(device), list(adapters)


def generate(
    pipe: LatentDDPMPipeline,
    settings: SampleSettings,
    saved_scheduler: SchedulerMixin,
    callback_on_step_end: Callable[[LatentDDPMPipeline, int, torch.Tensor, dict], dict] | None = None,
) -> list[PIL.Image.Image]:
    """Draw the images of `settings` with `pipe` (its model and adapters already set up by [`load_pipeline`]).

    Every call builds a fresh sampler from `saved_scheduler`'s config, so no state of a multistep solver carries over
    from an earlier call. The noise comes from a CPU generator seeded with `settings.seed`: one seed gives the same
    starting noise on every device.

    Args:
        pipe (`LatentDDPMPipeline`): the pipeline.
        settings (`SampleSettings`): prompts, steps, guidance, seed, sampler and size (`model`, `device` and the
            adapters are not read here).
        saved_scheduler (`SchedulerMixin`): the scheduler the model was saved with; its config is the noise schedule
            that every sampler walks.
        callback_on_step_end (`Callable`, *optional*): passed to the pipeline, e.g. to report progress.

    Returns:
        `settings.num_images` images per prompt, prompt by prompt.
    """
    if settings.scheduler is None:
        pipe.scheduler = type(saved_scheduler).from_config(saved_scheduler.config)
    else:
        pipe.scheduler = make_sampler(settings.scheduler, saved_scheduler.config)
    return pipe(
        settings.prompt,
        negative_prompt=settings.negative_prompt,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        num_images_per_prompt=settings.num_images,
        generator=torch.Generator().manual_seed(settings.seed),  # on the CPU: one seed, the same images on any device
        callback_on_step_end=callback_on_step_end,
    ).images
