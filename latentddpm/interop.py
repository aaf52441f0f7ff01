"""Pipelines across formats: load any pretrained pipeline for fine-tuning (ours, Stable Diffusion's diffusers layout
or a single-file checkpoint), and the `latentddpm convert` command. The conversions are in `latentddpm.convert`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from latentddpm.convert import save_single_file, stable_diffusion_components, to_stable_diffusion
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import DDPMNoiseScheduler


def load_pretrained_components(
    path_or_repo_id: str | os.PathLike, single_file_config: str | os.PathLike | None = None
) -> dict[str, Any]:
    r"""
    Everything a fine-tuning run takes from a pretrained pipeline: ours, a Stable Diffusion diffusers folder or Hub
    id, or a Stable Diffusion single-file checkpoint with its config folder.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): a `LatentDDPMPipeline` or `StableDiffusionPipeline` folder or Hub
            id, or a single-file checkpoint.
        single_file_config (`str` or `os.PathLike`, *optional*): for a single file, a diffusers Stable Diffusion
            folder or Hub id with the configs of its models.

    Returns:
        `dict` with `vae`, `text_encoder`, `tokenizer`, `unet` (a `ConditionalUNet`), `scheduler` (the pipeline's
        own, for sampling), `scheduler_config` (the `DDPMNoiseScheduler` config of the checkpoint's noise process:
        betas, prediction type, steps offset, timestep spacing, ...) and `use_attention_mask`.
    """
    if not Path(path_or_repo_id).is_file() and (
        DiffusionPipeline.load_config(path_or_repo_id)["_class_name"] == LatentDDPMPipeline.__name__
    ):
        pipe = LatentDDPMPipeline.from_pretrained(path_or_repo_id)
        components = {**pipe.components, "use_attention_mask": pipe.config.use_attention_mask}
        overrides = {}
    else:
        components = stable_diffusion_components(path_or_repo_id, single_file_config)
        # StableDiffusionPipeline never clips x_0 (its __init__ turns a scheduler's clip_sample off), while a PNDM
        # config, which has no such key, would get DDPM's default (on).
        overrides = {"clip_sample": False}
    # Keys of other schedulers (PNDM's `skip_prk_steps`, ...) drop out; missing ones take DDPM's defaults.
    scheduler = DDPMNoiseScheduler.from_config(components["scheduler"].config, **overrides)
    components["scheduler_config"] = dict(scheduler.config)
    return components


def main(argv: list[str]) -> None:
    """`latentddpm convert SRC --to {latentddpm,stable-diffusion,single-file} --out DST`."""
    parser = argparse.ArgumentParser(
        prog="latentddpm convert",
        description="Convert between LatentDDPMPipeline folders, Stable Diffusion diffusers folders and single-file "
        "(LDM layout) Stable Diffusion checkpoints.",
    )
    parser.add_argument("src", help="a LatentDDPMPipeline or StableDiffusionPipeline folder or Hub id, or one file")
    parser.add_argument("--to", required=True, choices=["latentddpm", "stable-diffusion", "single-file"])
    parser.add_argument("--out", required=True, type=Path, help="output folder, or the .safetensors for single-file")
    parser.add_argument(
        "--config_folder", default=None, help="for a single-file SRC: a diffusers folder or Hub id with its configs"
    )
    args = parser.parse_args(argv)

    components = load_pretrained_components(args.src, args.config_folder)
    components.pop("scheduler_config")
    pipe = LatentDDPMPipeline(**components)
    if args.to == "latentddpm":
        pipe.save_pretrained(args.out)
    elif args.to == "stable-diffusion":
        to_stable_diffusion(pipe).save_pretrained(args.out)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_single_file(to_stable_diffusion(pipe), args.out)
    print(json.dumps({"src": str(args.src), "to": args.to, "out": str(args.out)}))
