"""Time to quality: training minutes until a recipe's samples reach a quality target, recipes side by side.

Usage:
    python -m benchmarks.time_to_quality --task shapes [--recipes ours,plain] [--out outputs/benchmarks/ttq-shapes]
    python -m benchmarks.time_to_quality --task cifar10 [--data ../shared/datasets/cifar10/train.parquet]

Each recipe is one `train_ldm` run on the same data, VAE, U-Net config, batch, steps and LR schedule; only the
objective differs:
- ours: the config's recipe (v-prediction, min-SNR-5 weighting, EMA 0.999 for sampling);
- plain: epsilon prediction with the plain MSE, no min-SNR weighting, no EMA (the DDPM paper's L_simple).
Both use the same cosine noise schedule, so the comparison isolates the objective and the EMA.

The run measures quality every `--eval-every` steps with the EMA weights (when the recipe has them), and `train_ldm`
logs `train_minutes` at the same steps: wall time spent in training steps only, so the time taken by the
measurements themselves is not counted.
- shapes: the pixel judge on all 90 prompts (6 combinations held out of training), 25 DDPM steps, guidance 3, seed 0;
  the targets: colour, shape and position accuracy each >= 0.8, and all three right together on at least 95% of
  the prompts.
- cifar10: `latentddpm evaluate` on 500 samples (50 per class prompt), 25 DDPM steps, guidance 3, seed 0:
  accuracy of the reference classifier on the prompted class, and FID on that classifier's features (not comparable
  to published FID) against 10000 training images. The target is a class accuracy of `--cifar-target` (0.3, three
  times chance).

Stage 1 (the VAE) is trained once per task and shared by the recipes (`--vae` reuses one); on CIFAR-10 the reference
classifier is trained first too (`--classifier` reuses one). Prints a markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from latentddpm.configs import config_path
from latentddpm.eval.curves import load_scalars

RECIPES = {
    "ours": [],
    "plain": ["--noise_scheduler", "{prediction_type: epsilon}", "--snr_gamma", "none", "--use_ema", "false"],
}
SHAPES_METRICS = {  # short name -> logged tag
    "color": "shapes_color_acc",
    "shape": "shapes_shape_acc",
    "position": "shapes_position_acc",
    "all": "shapes_all_acc",
}
CIFAR_METRICS = {"class_acc": "eval/ddpm-25-cfg3/class_acc", "fid": "eval/ddpm-25-cfg3/fid"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["shapes", "cifar10"], default="shapes")
    parser.add_argument("--recipes", default="ours,plain", help=f"comma-separated, from {sorted(RECIPES)}")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/benchmarks/ttq-<task>")
    parser.add_argument("--data", default="../shared/datasets/cifar10/train.parquet", help="cifar10: the parquet")
    parser.add_argument("--vae", default=None, help="a trained VAE folder to reuse (default: train one)")
    parser.add_argument("--classifier", default=None, help="cifar10: a reference classifier folder to reuse")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="cifar10: steps to train the classifier")
    parser.add_argument("--max-train-steps", type=int, default=None, help="default: the task config's")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between measurements (200; cifar10 400)")
    parser.add_argument("--cifar-target", type=float, default=0.3, help="cifar10: class accuracy (chance: 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="print the report of a finished run in --out")
    return parser.parse_args(argv)


def train_stage1(args: argparse.Namespace, out: Path) -> tuple[str, dict]:
    """The task's VAE (and on CIFAR-10 the reference classifier); returns the VAE folder and stage-1 timings."""
    from latentddpm.training import train_vae

    timings = {}
    vae = args.vae
    if vae is None:
        start = time.perf_counter()
        vae_config = "shapes_vae.yaml" if args.task == "shapes" else "cifar10_vae.yaml"
        data = [] if args.task == "shapes" else ["--dataset", args.data]
        vae = str(train_vae.main(["--config", str(config_path(vae_config)), "--output_dir", str(out / "vae"), *data]))
        timings["vae_minutes"] = (time.perf_counter() - start) / 60
    if args.task == "cifar10" and args.classifier is None:
        from latentddpm.eval import train_classifier

        start = time.perf_counter()
        args.classifier = str(out / "classifier")
        steps = str(args.classifier_steps)
        train_classifier.main(["--dataset", args.data, "--output_dir", args.classifier, "--max_train_steps", steps])
        timings["classifier_minutes"] = (time.perf_counter() - start) / 60
        metrics = json.loads((Path(args.classifier) / "metrics.json").read_text())
        timings["classifier_heldout_accuracy"] = metrics["heldout_accuracy"]
    return vae, timings


def run_recipe(args: argparse.Namespace, out: Path, vae: str, recipe: str) -> Path:
    from latentddpm.training import train_ldm

    run_dir = out / recipe
    common = [
        "--vae",
        vae,
        "--output_dir",
        str(run_dir),
        "--cache_dir",
        str(out / "cache"),
        "--report_to",
        "tensorboard",
        "--checkpointing_steps",
        "0",
        "--seed",
        str(args.seed),
    ]
    if args.max_train_steps is not None:
        common += ["--max_train_steps", str(args.max_train_steps)]
    if args.task == "shapes":
        task = [
            "--config",
            str(config_path("shapes_ldm.yaml")),
            "--unet_config",
            str(config_path("unet/shapes.json")),
            "--validation_steps",
            str(args.eval_every),
        ]
    else:
        evaluation = {
            "data": args.data,
            "classifier": args.classifier,
            "schedulers": ["ddpm"],
            "steps": [25],
            "guidance": [3.0],
            "num_samples": 500,
            "batch_size": 250,
            "num_reference": 10000,
            "reconstruction_samples": 0,
            "seed": args.seed,
            "cache_dir": str(out / "reference_statistics"),
        }
        (out / "evaluation.yaml").write_text(yaml.safe_dump(evaluation))
        task = [
            "--config",
            str(config_path("cifar10_ldm.yaml")),
            "--unet_config",
            str(config_path("unet/small.json")),
            "--dataset",
            args.data,
            "--evaluation_config",
            str(out / "evaluation.yaml"),
            "--evaluation_steps",
            str(args.eval_every),
            "--validation_steps",
            "0",
        ]
    train_ldm.main([*task, *common, *RECIPES[recipe]])
    return run_dir


def quality_curve(run_dir: Path, task: str) -> list[dict]:
    """Per measured step: train minutes and the quality metrics, from the run's TensorBoard logs."""
    scalars = load_scalars(run_dir / "logs")
    minutes = dict(scalars["train_minutes"])
    names = SHAPES_METRICS if task == "shapes" else CIFAR_METRICS
    series = {short: dict(scalars[tag]) for short, tag in names.items()}
    steps = sorted(set.intersection(*(set(s) for s in series.values())))
    return [{"step": step, "minutes": minutes[step], **{k: s[step] for k, s in series.items()}} for step in steps]


def targets(args: argparse.Namespace) -> dict[str, Callable[[dict], bool]]:
    """The quality targets of a task, by description."""
    if args.task == "shapes":
        return {
            "color, shape and position each >= 0.8": lambda r: min(r["color"], r["shape"], r["position"]) >= 0.8,
            "all three right on >= 95% of the prompts": lambda r: r["all"] >= 0.95,
        }
    return {f"class accuracy >= {args.cifar_target}": lambda row: row["class_acc"] >= args.cifar_target}


def _format(key: str, value: float) -> str:
    return f"{value:.1f}" if key == "fid" else f"{value:.3f}"


def report(args: argparse.Namespace, curves: dict[str, list[dict]], timings: dict) -> str:
    """Markdown: train minutes (and step) to each target per recipe, the speed-ups, and each recipe's curve."""
    stage1 = ", ".join(f"{k} {v:.3f}" if "accuracy" in k else f"{k} {v:.1f}" for k, v in timings.items()) or "reused"
    keys = [k for k in next(iter(curves.values()))[0] if k not in ("step", "minutes")]
    goals = targets(args)
    lines = [
        f"Stage 1: {stage1}.",
        "",
        "| recipe | "
        + " | ".join(f"train minutes (step) to {goal}" for goal in goals)
        + f" | final {' / '.join(keys)} |",
        "| --- | " + " | ".join("---:" for _ in goals) + " | --- |",
    ]
    hits = {}
    for recipe, curve in curves.items():
        cells = []
        for goal, reached in goals.items():
            hits[recipe, goal] = hit = next((row for row in curve if reached(row)), None)
            cells.append(f"{hit['minutes']:.1f} ({hit['step']})" if hit else f"not within {curve[-1]['minutes']:.1f}")
        final = " / ".join(_format(k, curve[-1][k]) for k in keys)
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {final} |")
    speedups = [
        f"{goal}: **{hits['plain', goal]['minutes'] / hits['ours', goal]['minutes']:.2f}x**"
        for goal in goals
        if hits.get(("ours", goal)) and hits.get(("plain", goal))
    ]
    if speedups:
        lines += ["", "Speed-up to the target, plain / ours minutes: " + "; ".join(speedups) + "."]
    for recipe, curve in curves.items():
        lines += [
            "",
            f"{recipe}, at each measurement (train minutes leave out the measuring):",
            "",
            "| step | train minutes | " + " | ".join(keys) + " |",
            "| ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
        ]
        lines += [
            f"| {row['step']} | {row['minutes']:.1f} | " + " | ".join(_format(k, row[k]) for k in keys) + " |"
            for row in curve
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {sorted(RECIPES)}")
    out = args.out or Path("outputs/benchmarks") / f"ttq-{args.task}"
    if args.eval_every is None:
        args.eval_every = 200 if args.task == "shapes" else 400
    if args.report_only:  # from the logs, which hold every metric, and the stage-1 timings of the run
        timings = json.loads((out / "curves.json").read_text())["timings"]
        text = report(args, {recipe: quality_curve(out / recipe, args.task) for recipe in recipes}, timings)
        print(text)
        return text
    if args.task == "cifar10" and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data!r} does not exist (CIFAR-10 parquet, see ../shared/datasets/cifar10)")
    out.mkdir(parents=True, exist_ok=True)
    # stdout carries the report only; the training's prints (validation scores) go to stderr with its logs.
    with contextlib.redirect_stdout(sys.stderr):
        vae, timings = train_stage1(args, out)
        curves = {recipe: quality_curve(run_recipe(args, out, vae, recipe), args.task) for recipe in recipes}
    (out / "curves.json").write_text(json.dumps({"timings": timings, "curves": curves}, indent=2))
    text = report(args, curves, timings)
    print(text)
    return text


if __name__ == "__main__":
    main()
