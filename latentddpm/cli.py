"""The `latentddpm` command line: `latentddpm COMMAND [ARGS]`; `latentddpm COMMAND --help` lists a command's ARGS.

Each command is a function of its own argument list, so a command may parse them its own way (the training
commands read a YAML config plus `--key value` overrides).
"""

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.utils import make_image_grid

from latentddpm import convert
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import DDPMNoiseScheduler

# Samplers for `sample --scheduler`, built from the saved scheduler's config (same betas, prediction type, ...).
# `variance_type=None`: diffusers' DPM-Solver keeps only the first 3 channels of a learned-variance output (it was
# written for pixel-space DeepFloyd IF); without it the pipeline hands DPM-Solver the prediction alone.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMNoiseScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "variance_type": None}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def sample(argv: list[str]) -> None:
    """`latentddpm sample`: images from a saved pipeline, as one grid with a row per prompt."""
    parser = argparse.ArgumentParser(
        prog="latentddpm sample",
        description="Generate images with a saved LatentDDPMPipeline and write them as a grid (a row per prompt).",
    )
    parser.add_argument("--model", required=True, help="folder written by `save_pretrained`, or a Hub repo id")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: '')")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; <= 1 disables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator that draws all the noise")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (the grid's columns)")
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the saved scheduler)"
    )
    parser.add_argument("--height", type=int, default=None, help="default: the U-Net's training size")
    parser.add_argument("--width", type=int, default=None, help="default: the U-Net's training size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="where to write the PNG grid")
    args = parser.parse_args(argv)

    pipe = LatentDDPMPipeline.from_pretrained(args.model).to(args.device)
    if args.scheduler is not None:
        scheduler_class, overrides = SCHEDULERS[args.scheduler]
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(args.prompt), cols=args.num_images).save(args.out)
    print(f"wrote {len(images)} images to {args.out}")


def train_vae(argv: list[str]) -> None:
    """Stage 1, the autoencoder: `latentddpm train-vae --config configs/shapes_vae.yaml [--key value ...]`."""
    from latentddpm.training import train_vae

    train_vae.main(argv)


def train_ldm(argv: list[str]) -> None:
    """Stage 2, the diffusion U-Net: `latentddpm train-ldm --config configs/shapes_ldm.yaml [--key value ...]`."""
    from latentddpm.training import train_ldm

    train_ldm.main(argv)


def demo(argv: list[str]) -> None:
    """The offline demo: both stages on the shapes dataset, then sampling and scoring."""
    from latentddpm.training import demo

    demo.main(argv)


def evaluate(argv: list[str]) -> None:
    """Metric sweeps over guidance scales, step counts and schedulers, with plots and an HTML report."""
    from latentddpm.eval import sweep

    sweep.main(argv)


# command name -> function of the command's arguments
COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "sample": sample,
    "train-vae": train_vae,
    "train-ldm": train_ldm,
    "demo": demo,
    "evaluate": evaluate,
    "convert": convert.main,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentddpm", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=list(COMMANDS), help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments (see COMMAND --help)")
    args = parser.parse_args(argv)
    COMMANDS[args.command](args.args)


if __name__ == "__main__":
    main()
