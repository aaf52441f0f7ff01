"""Regenerate BENCHMARKS.md: run the benchmarks, keep each section's results, assemble the page.

Usage:
    python -m benchmarks.report                               # every section: about 2 hours on 2 CPU cores
    python -m benchmarks.report --sections unet,pipeline      # rerun these; the others keep their last results
    python -m benchmarks.report --render-only                 # rebuild the page from benchmarks/results/

A section is a prose template, `benchmarks/sections/<name>.md` (what is measured, how, and what we learned), whose
`<!-- results -->` line is replaced by the section's latest results, `benchmarks/results/<name>.md`: the output of
its commands with the commands themselves, the date and the machine they ran on. Long runs (the demo, the
time-to-quality trainings) write their models and logs under `--work`.

Run it on an idle machine: on a shared CPU, torch's spinning OpenMP threads make timings swing by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch

ROOT = Path(__file__).resolve().parent
MARKER = "<!-- results -->"


@dataclass
class Section:
    title: str
    run: Callable[[argparse.Namespace], tuple[list[str], str]]  # -> (commands run, markdown results)


def _run(command: list[str], log: Path | None = None) -> str:
    """Run a command from the repository root; returns its stdout (stderr goes to `log`, or passes through)."""
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    stderr = open(log, "w") if log else None  # noqa: SIM115 (closed below)
    try:
        result = subprocess.run(command, cwd=ROOT.parent, stdout=subprocess.PIPE, stderr=stderr, text=True, check=True)
    finally:
        if stderr:
            stderr.close()
    return result.stdout


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def _shown(command: list[str]) -> str:
    """The command as a user types it (`python -m ...`, not this interpreter's path)."""
    return shlex.join(["python" if part == sys.executable else part for part in command])


def command_outputs(*commands: list[str], code_block: bool) -> Callable[[argparse.Namespace], tuple[list[str], str]]:
    """A section that runs `commands` and shows their stdout, fenced as code when it is a plain-text table."""

    def run(args: argparse.Namespace) -> tuple[list[str], str]:
        outputs = [_run(command).strip() for command in commands]
        if code_block:
            outputs = [f"```\n{output}\n```" for output in outputs]
        return [_shown(c) for c in commands], "\n\n".join(outputs)

    return run


def demo(args: argparse.Namespace) -> tuple[list[str], str]:
    """The README's demo, timed stage by stage; its saved pipeline scored on all 90 prompts."""
    out = Path(args.demo_dir) if args.demo_dir else Path(args.work) / "demo"
    command = ["latentddpm", "demo", "--output_dir", str(out)]
    if not args.demo_dir:
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
    heldout = {k: v for k, v in scores.items() if k.startswith("heldout_")}
    if heldout:
        lines += ["", "The 6 held-out combinations alone: " + ", ".join(f"{k} {v:.3f}" for k, v in heldout.items())]
    return [shlex.join(command)], "\n".join(lines)


def schedulers(args: argparse.Namespace) -> tuple[list[str], str]:
    """Quality against sampling steps for each scheduler, on the demo's pipeline."""
    demo_dir = Path(args.demo_dir) if args.demo_dir else Path(args.work) / "demo"
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
    return [shlex.join(command)], "\n".join(lines)


def time_to_quality(task: str) -> Callable[[argparse.Namespace], tuple[list[str], str]]:
    def run(args: argparse.Namespace) -> tuple[list[str], str]:
        command = _module("benchmarks.time_to_quality", "--task", task, "--out", str(Path(args.work) / f"ttq-{task}"))
        if task == "shapes" and args.demo_dir:  # stage 1 is the demo's, bit for bit: reuse it
            command += ["--vae", str(Path(args.demo_dir) / "vae")]
        text = _run(command, log=Path(args.work) / f"ttq-{task}.log")
        return [_shown(command)], text.strip()

    return run


SECTIONS: dict[str, Section] = {
    "demo": Section("The demo: train on shapes, then sample (2-core CPU)", demo),
    "time_to_quality_shapes": Section(
        "Time to quality on shapes: our recipe vs plain epsilon/MSE", time_to_quality("shapes")
    ),
    "time_to_quality_cifar10": Section(
        "Time to quality on CIFAR-10 (small config, CPU budget)", time_to_quality("cifar10")
    ),
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
    parser.add_argument("--demo-dir", default=None, help="use this finished `latentddpm demo` run, not a new one")
    parser.add_argument("--output", type=Path, default=ROOT.parent / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = [] if args.render_only else args.sections.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (ROOT / "results").mkdir(exist_ok=True)
    for name in names:
        commands, results = SECTIONS[name].run(args)
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        header = f"Measured {date} on {machine()}, with:\n\n" + "\n".join(f"    {c}" for c in commands)
        (ROOT / "results" / f"{name}.md").write_text(f"{header}\n\n{results}\n")
        args.output.write_text(render())  # after every section, so a long run shows progress
        print(f"{name}: done", file=sys.stderr, flush=True)
    args.output.write_text(render())
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
