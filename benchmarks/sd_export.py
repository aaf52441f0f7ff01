"""A saved shapes pipeline in diffusers' own `StableDiffusionPipeline`: exported with `latentddpm convert --to
stable-diffusion` (our `DDPMNoiseScheduler` becomes diffusers' `DDPMScheduler` with the same config), then both
pipelines sample the 90 shapes prompts (25 steps, guidance 3, seed 0, the noise drawn on the CPU) and the pixel judge
scores them, side by side.

Usage:
    python -m benchmarks.sd_export --model outputs/demo/pipeline --out outputs/demo/stable-diffusion
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging

from latentddpm import LatentDDPMPipeline
from latentddpm.eval.shapes_judge import score_shapes_prompts
from latentddpm.interop import main as convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved LatentDDPMPipeline trained on shapes")
    parser.add_argument("--out", required=True, type=Path, help="where the Stable Diffusion folder is written")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    logging.set_verbosity_error()

    with contextlib.redirect_stdout(io.StringIO()):  # the command's own one-line JSON summary
        convert([args.model, "--to", "stable-diffusion", "--out", str(args.out)])
    pipelines = {
        "LatentDDPMPipeline": LatentDDPMPipeline.from_pretrained(args.model),
        "StableDiffusionPipeline (exported)": StableDiffusionPipeline.from_pretrained(str(args.out)),
    }
    scores, images = {}, {}
    for name, pipeline in pipelines.items():
        pipeline.set_progress_bar_config(disable=True)
        scores[name], pil_images = score_shapes_prompts(pipeline, args.steps, args.guidance, seed=0)
        images[name] = np.stack([np.asarray(image, dtype=np.int16) for image in pil_images])
    exported = pipelines["StableDiffusionPipeline (exported)"]
    print(f"scheduler of the exported pipeline: {type(exported.scheduler).__name__}\n")
    metrics = ("color_acc", "shape_acc", "position_acc", "all_acc")
    print("| pipeline | color | shape | position | all three |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in scores.items():
        print(f"| {name} | " + " | ".join(f"{values[k]:.3f}" for k in metrics) + " |")
    ours, theirs = scores.values()
    print("| difference | " + " | ".join(f"{abs(ours[k] - theirs[k]):.3f}" for k in metrics) + " |")
    a, b = images.values()
    print(f"\nlargest difference between the two pipelines' 8-bit pixels: {np.abs(a - b).max()} of 255")


if __name__ == "__main__":
    main()
