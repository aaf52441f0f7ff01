"""Stage-1 autoencoders on a shape and colour they never saw: orange five-pointed stars.

Usage:
    python -m benchmarks.vae_stars --vae shapes-only=OLD_DEMO/vae --vae polygons=outputs/demo/vae \
        --grid benchmarks/results/vae_stars.png

Held-out images: an orange (255, 140, 0) regular five-pointed star, point up, 16 and 20 px across on a black 32x32
image, at each of the shapes dataset's 5 positions (neither the shapes nor the polygons dataset has a colour within 48
of orange). Each VAE encodes them and decodes the posterior mean; the table gives the PSNR of the reconstructions and
what the star judge (`latentddpm.eval.stars`) reads off them: outline solidity (the drawn star's is ~0.6 at 16 px, a
pentagon's > 0.9), the distance of the mean star pixel's colour (brightness normalised) to orange, and how many are
still read as an orange concave star at the right place. A second table checks the demo's own domain: PSNR on 180 fresh
shapes images and the shapes judge's accuracy (all three attributes) on their reconstructions. The grid shows, per VAE,
the held-out stars and `benchmarks.dreambooth_star`'s 5 instance images: the originals in the first row, each VAE's
reconstructions below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import make_image_grid
from PIL import Image

from benchmarks.dreambooth_star import instance_images, magnify
from latentddpm.data.shapes import POSITIONS, make_shapes_dataset
from latentddpm.eval.reconstruction import psnr
from latentddpm.eval.sampling import to_pil
from latentddpm.eval.shapes_judge import score_shapes
from latentddpm.eval.stars import render_star, score_stars

DIAMETERS = (16, 20)
NUM_SHAPES_IMAGES = 180  # 2 of each of the 90 combinations


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: list[Image.Image]) -> torch.Tensor:
    """The decoded posterior means of `images`, `(N, 3, H, W)` in [0, 1]."""
    reconstruction = vae(to_tensor(images) * 2 - 1, sample_posterior=False).sample
    return ((reconstruction.clamp(-1, 1) + 1) / 2).float()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB images -> `(N, 3, H, W)` in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]).float() / 255


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", action="append", required=True, help="NAME=FOLDER of a saved AutoencoderKL")
    parser.add_argument("--grid", type=Path, help="write the originals and reconstructions here (PNG)")
    args = parser.parse_args(argv)
    vaes = dict(entry.split("=", 1) for entry in args.vae)

    stars = [(position, diameter) for diameter in DIAMETERS for position in POSITIONS]
    originals = [render_star(position, diameter) for position, diameter in stars]
    positions = [position for position, _ in stars]
    instances = [image for image, _ in instance_images()]
    rows = {"drawn": (originals, None)} | {
        name: (None, AutoencoderKL.from_pretrained(folder).eval()) for name, folder in vaes.items()
    }

    lines = [
        "| images | star size | PSNR (dB) | mean solidity | colour distance to orange | orange concave star "
        "at the right place |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    grid = []
    for name, (images, vae) in rows.items():
        if vae is not None:
            reconstructions = reconstruct(vae, originals)
            images = to_pil(reconstructions)
            errors = psnr(reconstructions, to_tensor(originals))
        grid += images + (instances if vae is None else to_pil(reconstruct(vae, instances)))
        for diameter in DIAMETERS:
            chosen = [i for i, (_, d) in enumerate(stars) if d == diameter]
            scores = score_stars([images[i] for i in chosen], [positions[i] for i in chosen])
            decibels = f"{errors[chosen].mean().item():.2f}" if vae is not None else "-"
            lines.append(
                f"| {name} | {diameter} px | {decibels} | {scores['solidity']:.2f} | {scores['color_distance']:.1f} | "
                f"{round(scores['star_acc'] * scores['n'])} of {scores['n']} |"
            )
    shapes = make_shapes_dataset(NUM_SHAPES_IMAGES, seed=12345)  # a seed no training run uses
    lines += ["", "| VAE | shapes PSNR (dB) | shapes judge on reconstructions (all three right) |"]
    lines += ["| --- | ---: | ---: |"]
    for name, (_, vae) in rows.items():
        if vae is not None:
            reconstructions = reconstruct(vae, shapes["image"])
            decibels = psnr(reconstructions, to_tensor(shapes["image"])).mean().item()
            accuracy = score_shapes(to_pil(reconstructions), shapes["text"])["all_acc"]
            lines.append(f"| {name} | {decibels:.2f} | {accuracy:.3f} |")
    if args.grid is not None:
        columns = len(originals) + len(instances)
        make_image_grid([magnify(image) for image in grid], rows=len(rows), cols=columns).save(args.grid)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
