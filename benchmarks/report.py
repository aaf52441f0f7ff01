"""Regenerate BENCHMARKS.md: run the benchmarks, keep each section's results, assemble the page.

Usage:
    python -m benchmarks.report                               # every section: about 2 hours on 2 CPU cores
    python -m benchmarks.report --sections unet,pipeline      # rerun these; the others keep their last results
    python -m benchmarks.report --render-only                 # rebuild the page from benchmarks/results/

A section is a prose template, `benchmarks/sections/<name>.md` (what is measured, how, and what we learned), whose
`<!-- results -->` line is replaced by the section's latest results, `benchmarks/results/<name>.md`: the output of
its commands with the commands themselves, the date and the machine they ran on. Long runs (the demo, the
time-to-quality trainings, the scheduler sweep) write their models and logs under `--work`; `--reuse` renders
their sections from finished runs there instead of running them again.

Run it on an idle machine: on a shared CPU, torch's spinning OpenMP threads make timings swing by up to 10x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch

ROOT = Path(__file__).resolve().parent
MARKER = "<!-- results -->"


@dataclass
class Results:
    commands: list[str]  # as a user types them
    markdown: str
    finished: Path | None = None  # a file the run wrote last: its time is when the results were measured


@dataclass
class Section:
    title: str
    run: Callable[[argparse.Namespace], Results]


def _run(command: list[str], log: Path | None = None) -> str:
    """Run a command from the repository root; returns its stdout (stderr goes to `log`, or passes through)."""
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    with open(log, "w") if log else contextlib.nullcontext() as stderr:
        result = subprocess.run(command, cwd=ROOT.parent, stdout=subprocess.PIPE, stderr=stderr, text=True, check=True)
    return result.stdout


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def _shown(command: list[str]) -> str:
    """The command as a user types it (`python -m ...`, not this interpreter's path)."""
    return shlex.join(["python" if part == sys.executable else part for part in command])


def command_outputs(*commands: list[str], code_block: bool) -> Callable[[argparse.Namespace], Results]:
    """A section that runs `commands` and shows their stdout, fenced as code when it is a plain-text table."""

    def run(args: argparse.Namespace) -> Results:
        outputs = [_run(command).strip() for command in commands]
        if code_block:
            outputs = [f"```\n{output}\n```" for output in outputs]
        return Results([_shown(c) for c in commands], "\n\n".join(outputs))

    return run


def demo(args: argparse.Namespace) -> Results:
    """The README's demo, timed stage by stage; its saved pipeline scored on all 90 prompts."""
    out = Path(args.work) / "demo"
    command = ["latentddpm", "demo", "--output_dir", str(out)]
    if not (args.reuse and (out / "scores.json").exists()):
        shutil.rmtree(out, ignore_errors=True)  # as on a fresh machine: no latent cache from an earlier run
        _run(command, log=Path(args.work) / "demo.log")
    scores = json.loads((out / "scores.json").read_text())
    vae = json.loads((out / "vae" / "manifest.json").read_text())["final_metrics"]
    total = scores["vae_minutes"] + scores["ldm_minutes"] + scores["sample_minutes"]
    lines = [
        "| stage | wall minutes | result |",
        "| --- | ---: | --- |",
        f"| 1. VAE | {scores['vae_minutes']:.1f} | held-out PSNR {vae['psnr']:.2f} dB; latent mean "
        f"{vae['latent_mean']:.4f}, std {vae['latent_std']:.4f} |",
        f"| 2. LDM (caching, training, validations, saving) | {scores['ldm_minutes']:.1f} | |",
        f"| 3. load with `from_pretrained`, sample and score 90 prompts | {scores['sample_minutes']:.1f} | "
        f"color **{scores['color_acc']:.3f}**, shape **{scores['shape_acc']:.3f}**, position "
        f"**{scores['position_acc']:.3f}** (all three right: {scores['all_acc']:.3f}) |",
        f"| total | **{total:.1f}** | |",
    ]
    if "heldout_n" in scores:
        accuracies = ", ".join(f"{k} {scores[f'heldout_{k}_acc']:.3f}" for k in ("color", "shape", "position", "all"))
        lines += ["", f"The {scores['heldout_n']} combinations held out of training, alone: {accuracies}."]
    # The same pipeline exported to Stable Diffusion's format, sampled by diffusers' own StableDiffusionPipeline.
    export = _module("benchmarks.sd_export", "--model", str(out / "pipeline"), "--out", str(out / "stable-diffusion"))
    lines += ["", _run(export).strip()]
    return Results([shlex.join(command), _shown(export)], "\n".join(lines), out / "scores.json")


def vae_stars(args: argparse.Namespace) -> Results:
    """The demo's VAE (polygons, L2) against the same config trained on the shapes alone, and with L1, on held-out
    stars."""
    variants = {  # name: the demo's VAE config with these keys changed
        "shapes only, L1 (the earlier demo's)": ["--dataset", "shapes", "--reconstruction_loss", "l1"],
        "polygons, L1": ["--reconstruction_loss", "l1"],
    }
    commands, command = [], _module("benchmarks.vae_stars")
    for name, keys in variants.items():
        folder = Path(args.work) / ("vae_" + "_".join(keys[1::2]))
        train = ["latentddpm", "train-vae", "--config", "configs/shapes_vae.yaml", *keys, "--output_dir", str(folder)]
        if not (args.reuse and (folder / "config.json").exists()):
            _run(train, log=folder.with_suffix(".log"))
        commands.append(shlex.join(train))
        command += ["--vae", f"{name}={folder}"]
    grid = ROOT / "results" / "vae_stars.png"
    command += ["--vae", f"polygons, L2 (the demo's)={Path(args.work) / 'demo' / 'vae'}", "--grid", str(grid)]
    text = _run(command).strip()
    picture = f"![held-out stars and instance images, reconstructed]({grid.relative_to(ROOT.parent)})"
    return Results([*commands, _shown(command)], f"{text}\n\n{picture}", grid)


def dreambooth_star(args: argparse.Namespace) -> Results:
    """DreamBooth-LoRA of an orange star into the demo's pipeline, with and without prior preservation."""
    out = Path(args.work) / "dreambooth_star"
    command = _module("benchmarks.dreambooth_star", "--pipeline", str(Path(args.work) / "demo" / "pipeline"))
    command += ["--out", str(out)]
    if args.reuse and (out / "results.json").exists():
        text = _run([*command, "--report-only"])
    else:
        text = _run(command, log=Path(args.work) / "dreambooth_star.log")
    grid = ROOT / "results" / "dreambooth_star.png"
    shutil.copyfile(out / "stars.png", grid)
    picture = f"![sks star samples: base, with and without prior preservation]({grid.relative_to(ROOT.parent)})"
    return Results([_shown(command)], f"{text.strip()}\n\n{picture}", out / "results.json")


def schedulers(args: argparse.Namespace) -> Results:
    """Quality against sampling steps for each scheduler, on the demo's pipeline."""
    demo_dir = Path(args.work) / "demo"
    out = Path(args.work) / "schedulers"
    command = [
        "latentddpm",
        "evaluate",
        "--model",
        str(demo_dir / "pipeline"),
        "--data",
        "shapes",
        "--schedulers",
        "ddpm,ddim,dpmsolver++",
        "--steps",
        "5,10,25,50",
        "--guidance",
        "3",
        "--num_samples",
        "90",
        "--seed",
        "0",
        "--reconstruction_samples",
        "0",
        "--out",
        str(out),
    ]
    if not (args.reuse and (out / "metrics.json").exists()):
        _run(command, log=Path(args.work) / "schedulers.log")
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    lines = [
        "| scheduler | steps | all three right | color | shape | position | seconds / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheduler']} | {row['steps']} | {row['all_acc']:.3f} | {row['color_acc']:.3f} | "
            f"{row['shape_acc']:.3f} | {row['position_acc']:.3f} | {row['seconds_per_image']:.3f} |"
        )
    return Results([shlex.join(command)], "\n".join(lines), out / "metrics.json")


def time_to_quality(task: str) -> Callable[[argparse.Namespace], Results]:
    def run(args: argparse.Namespace) -> Results:
        out = Path(args.work) / f"ttq-{task}"
        command = _module("benchmarks.time_to_quality", "--task", task, "--out", str(out))
        if task == "shapes" and (Path(args.work) / "demo" / "vae").exists():  # the demo's stage 1, bit for bit
            command += ["--vae", str(Path(args.work) / "demo" / "vae")]
        if args.reuse and (out / "curves.json").exists():
            text = _run([*command, "--report-only"])
        else:
            text = _run(command, log=Path(args.work) / f"ttq-{task}.log")
        return Results([_shown(command)], text.strip(), out / "curves.json")

    return run


SECTIONS: dict[str, Section] = {
    "demo": Section("The demo: train on shapes, then sample (2-core CPU)", demo),
    "time_to_quality_shapes": Section(
        "Time to quality on shapes: our recipe vs plain epsilon/MSE", time_to_quality("shapes")
    ),
    "time_to_quality_cifar10": Section(
        "Time to quality on CIFAR-10 (small config, CPU budget)", time_to_quality("cifar10")
    ),
    "vae_stars": Section("A stage-1 VAE that can see new things: held-out stars", vae_stars),
    "dreambooth_star": Section("A concept the base never saw: DreamBooth-LoRA on 2 CPU cores", dreambooth_star),
    "schedulers": Section("Quality against sampling steps, per scheduler", schedulers),
    "training": Section(
        "Training step: train_ldm's loop vs the same loop on diffusers' classes",
        command_outputs(_module("benchmarks.training", "--steps", "15", "--batch", "128"), code_block=False),
    ),
    "unet": Section(
        "U-Net vs UNet2DConditionModel",
        command_outputs(
            _module("benchmarks.unet", "--iters", "30", "--threads", "1"),
            _module("benchmarks.unet", "--iters", "30"),
            code_block=True,
        ),
    ),
    "pipeline": Section(
        "Pipeline overhead",
        command_outputs(
            _module("benchmarks.pipeline", "--threads", "1", "--repeats", "7"),
            _module("benchmarks.pipeline", "--repeats", "7"),
            code_block=False,
        ),
    ),
    "lora": Section(
        "LoRA vs full fine-tuning of the U-Net",
        command_outputs(_module("benchmarks.lora", "--configs", "small,base", "--threads", "1"), code_block=False),
    ),
    "gpu": Section(
        "GPU: training and sampling throughput against diffusers",
        command_outputs(_module("benchmarks.gpu"), code_block=False),
    ),
    "contention": Section(
        "Training step on a CPU another process keeps busy; torch.compile on CPU",
        command_outputs(
            _module("benchmarks.contention"), _module("benchmarks.contention", "--compile"), code_block=False
        ),
    ),
    "data_scale": Section(
        "Data at scale: the single-file latent cache vs the sharded, memory-mapped one",
        command_outputs(_module("benchmarks.data_scale"), code_block=False),
    ),
    "sd_sampling": Section(
        "Stable Diffusion: imported pipeline vs StableDiffusionPipeline",
        command_outputs(
            _module(
                "benchmarks.sd_sampling", "--latent_size", "8", "--steps", "50", "--repeats", "2", "--threads", "1"
            ),
            code_block=False,
        ),
    ),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    device = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        device += f", {torch.cuda.get_device_name()}"
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"
    return f"{device}; {versions}"


def render() -> str:
    """BENCHMARKS.md from the templates and the latest results."""
    parts = [(ROOT / "sections" / "intro.md").read_text().strip()]
    contents = [f"- [{section.title}](#{_anchor(section.title)})" for section in SECTIONS.values()]
    parts.append("\n".join(contents))
    for name, section in SECTIONS.items():
        results_path = ROOT / "results" / f"{name}.md"
        results = results_path.read_text().strip() if results_path.exists() else "_Not measured yet._"
        template = (ROOT / "sections" / f"{name}.md").read_text().strip()
        if MARKER not in template:
            raise ValueError(f"{name}.md has no {MARKER} line")
        parts.append(f"## {section.title}\n\n" + template.replace(MARKER, results))
    return "\n\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    parser.add_argument("--render-only", action="store_true", help="rebuild BENCHMARKS.md from the kept results")
    parser.add_argument("--work", default="outputs/benchmarks", help="where long runs write models and logs")
    parser.add_argument("--reuse", action="store_true", help="render long sections from finished runs in --work")
    parser.add_argument("--output", type=Path, default=ROOT.parent / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = [] if args.render_only else args.sections.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (ROOT / "results").mkdir(exist_ok=True)
    for name in names:
        results = SECTIONS[name].run(args)
        when = results.finished.stat().st_mtime if results.finished else time.time()
        date = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d")
        header = f"Measured {date} on {machine()}, with:\n\n" + "\n".join(f"    {c}" for c in results.commands)
        (ROOT / "results" / f"{name}.md").write_text(f"{header}\n\n{results.markdown}\n")
        args.output.write_text(render())  # after every section, so a long run shows progress
        print(f"{name}: done", file=sys.stderr, flush=True)
    args.output.write_text(render())
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
