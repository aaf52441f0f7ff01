"""DreamBooth-LoRA on 2 CPU cores: teach the demo's shapes pipeline an orange star it never saw.

Usage:
    python -m benchmarks.dreambooth_star --pipeline outputs/demo/pipeline --out outputs/benchmarks/dreambooth_star
    python -m benchmarks.dreambooth_star --pipeline outputs/demo/pipeline --report-only   # the table of a finished run

1. Instance data: 5 images of an orange (255, 140, 0) five-pointed star about 16 px across on black, at the top left,
   the center and the bottom right only, each captioned "a sks star in the {position}" (a .txt beside it).
2. Two DreamBooth-LoRA runs of `train_ldm` from the saved pipeline, the same but for prior preservation: with it,
   the class images are the base's own samples of its 90 shapes prompts (`class_prompt` = those prompts).
3. Each adapter is loaded into the base pipeline (`load_lora_weights`) and judged:
   - "a sks star in the {position}" for all 5 positions (2 never in the instance data) x 4 seeds, by the star judge
     (`latentddpm.eval.stars`: an orange outline with a concave outline at the right place). Goal: >= 80% of the 20;
   - the base's 90 prompts by the shapes judge. Goal: >= 0.95 colour, shape and position: the adapter must not
     overwrite what the base knew (what prior preservation is for; the run without it shows the drop).
   The base alone is judged the same way for reference.

Prints a markdown table, and writes `results.json` and a grid of the star samples (`stars.png`, one row per run,
5 positions x 4 seeds) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps

from latentddpm.data.shapes import POSITIONS, shapes_prompts
from latentddpm.eval.sampling import generate_images, to_pil
from latentddpm.eval.shapes_judge import score_shapes
from latentddpm.eval.stars import render_star, score_stars
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.training import train_ldm

INSTANCE_CAPTION = "a sks star in the {position}"
# (position, diameter in px, offset (x, y) of the centre in px): 3 positions only, small variations of size and place.
INSTANCE_STARS: tuple[tuple[str, float, tuple[float, float]], ...] = (
    ("top left", 16.0, (0.0, 0.0)),
    ("center", 16.0, (0.0, 0.0)),
    ("bottom right", 16.0, (0.0, 0.0)),
    ("top left", 15.0, (1.0, 1.0)),
    ("bottom right", 17.0, (-1.0, -0.5)),
)
NUM_SEEDS = 4
GOALS = {"star_acc": 0.8, "color_acc": 0.95, "shape_acc": 0.95, "position_acc": 0.95}


def instance_images(size: int = 32) -> list[tuple[Image.Image, str]]:
    """The 5 instance images and their captions."""
    return [
        (render_star(position, diameter, size=size, offset=offset), INSTANCE_CAPTION.format(position=position))
        for position, diameter, offset in INSTANCE_STARS
    ]


def write_instance_folder(folder: Path, size: int = 32) -> Path:
    """`00.png` + `00.txt` (its caption), ... in `folder`, as `train_ldm`'s `instance_data` reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, caption) in enumerate(instance_images(size)):
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(caption)
    return folder


def train_adapter(args: argparse.Namespace, run_dir: Path, prior_preservation: bool) -> float:
    """One DreamBooth-LoRA run of `train_ldm` into `run_dir`; returns its wall minutes (caching and class images
    included)."""
    class_prompts = run_dir.parent / "class_prompts.txt"
    class_prompts.write_text("\n".join(shapes_prompts()) + "\n")
    argv = [
        "--pretrained_pipeline", args.pipeline,
        "--instance_data", str(write_instance_folder(run_dir.parent / "instance")),
        "--instance_prompt", "a sks star",
        "--with_prior_preservation", str(prior_preservation).lower(),
        "--class_prompt", str(class_prompts),
        "--num_class_images", str(len(shapes_prompts())),
        "--prior_loss_weight", str(args.prior_loss_weight),
        "--lora_rank", str(args.rank),
        "--lora_alpha", str(args.rank),
        "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--caption_dropout", "0.0",
        "--use_ema", "false",
        "--checkpointing_steps", "0",
        "--validation_steps", "0",
        "--report_to", "none",
        "--seed", str(args.seed),
        "--cache_dir", str(run_dir.parent / "cache"),
        "--output_dir", str(run_dir),
    ]  # fmt: skip
    start = time.perf_counter()
    train_ldm.main(argv)
    return (time.perf_counter() - start) / 60


def judge(pipeline: LatentDDPMPipeline, args: argparse.Namespace) -> tuple[dict, list[Image.Image]]:
    """Star scores on 5 positions x `NUM_SEEDS` seeds and shapes scores on the 90 prompts; the star images (seed
    major)."""
    positions = list(POSITIONS)
    prompts = [INSTANCE_CAPTION.format(position=position) for position in positions]
    images = []
    for seed in range(NUM_SEEDS):
        images += to_pil(generate_images(pipeline, prompts, args.inference_steps, args.guidance, seed=seed))
    scores = {"star": score_stars(images, positions * NUM_SEEDS)}
    shapes = to_pil(generate_images(pipeline, shapes_prompts(), args.inference_steps, args.guidance, seed=0))
    scores["shapes"] = score_shapes(shapes, shapes_prompts())
    return scores, images


def magnify(image: Image.Image) -> Image.Image:
    """32x32 -> 96x96 without smoothing (pixels stay pixels), in a grey frame that separates grid cells."""
    return ImageOps.expand(image.resize((96, 96), Image.Resampling.NEAREST), border=2, fill=(80, 80, 80))


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"DreamBooth-LoRA (rank {args.rank}, {args.steps} steps of batch {args.batch_size}, learning rate "
        f"{args.learning_rate}, prior_loss_weight {args.prior_loss_weight}); {args.inference_steps} sampling steps, "
        f"guidance {args.guidance}.",
        "",
        "| adapter | training minutes | sks star right (of 20) | concave | orange | right place | mean solidity | "
        "90 prompts: color | shape | position |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        star, shapes = result["star"], result["shapes"]
        minutes = f"{result['minutes']:.1f}" if "minutes" in result else "-"
        solidity = f"{star['solidity']:.2f}" if star["solidity"] is not None else "-"
        lines.append(
            f"| {name} | {minutes} | **{round(star['star_acc'] * star['n'])}** ({star['star_acc']:.2f}) | "
            f"{star['concave_acc']:.2f} | {star['color_acc']:.2f} | {star['position_acc']:.2f} | {solidity} | "
            f"**{shapes['color_acc']:.3f}** | **{shapes['shape_acc']:.3f}** | **{shapes['position_acc']:.3f}** |"
        )
    goals = ", ".join(f"{key} >= {value}" for key, value in GOALS.items())
    return "\n".join(lines + ["", f"Goals: {goals} (star_acc on the sks prompts, the others on the 90 prompts)."])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="the base: a saved LatentDDPMPipeline (the demo's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/dreambooth_star"))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the U-Net's attention projections")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (fit them in 5 minutes)")
    parser.add_argument("--batch_size", type=int, default=8, help="instance rows per step (as many class rows)")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--inference_steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="print the table of the results.json in --out")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        print(report({k: v for k, v in saved.items() if k != "args"}, argparse.Namespace(**saved["args"])))
        return saved
    args.out.mkdir(parents=True, exist_ok=True)

    pipeline = LatentDDPMPipeline.from_pretrained(args.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    results, rows = {}, []
    results["base (no adapter)"], images = judge(pipeline, args)
    rows.append(images)
    for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
        run_dir = args.out / name.replace(" ", "_")
        minutes = train_adapter(args, run_dir, prior)
        pipeline.load_lora_weights(str(run_dir))
        results[name], images = judge(pipeline, args)
        results[name]["minutes"] = minutes
        pipeline.unload_lora_weights()
        rows.append(images)
    # One row per run: 5 positions x 4 seeds.
    grid = [magnify(image) for row in rows for image in row]
    make_image_grid(grid, rows=len(rows), cols=len(rows[0])).save(args.out / "stars.png")
    saved_args = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"args": saved_args, **results}, indent=2))
    print(report(results, args))
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
