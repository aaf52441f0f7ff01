"""LoRA against full fine-tuning of the U-Net: step time, peak memory, trainable parameters and file size.

Usage:
    python -m benchmarks.lora [--configs small,base] [--rank 4] [--batch 1] [--latent_size 8] [--steps 3]
        [--device cpu|cuda] [--threads 1]

Each U-Net config (configs/unet/<name>.json, random weights: the cost does not depend on them) is trained both ways,
each in its own fresh process so that peak memory is its own:
    - full: AdamW over every weight of the U-Net, as `train_ldm` with `lora_rank: 0`;
    - LoRA: the U-Net frozen, rank-`--rank` adapters on the attention projections (to_q, to_k, to_v, to_out.0) added
      and saved with `latentddpm.lora`, AdamW over the adapters alone, as `train_ldm` with `lora_rank`.
The step is train_ldm's: `latentddpm.losses.training_loss` (the demo's noise schedule and objective, from
configs/shapes_ldm.yaml), backward, gradient clipping, AdamW step; no EMA (diffusers' LoRA example has none), on one
fixed batch of `--batch` latents of `--latent_size`^2 and prompt states of `--seq_len` tokens.

Time: median of `--steps` steps after `--warmup` (the first step also allocates AdamW's state). Peak memory: the
process's peak resident set size (`ru_maxrss`: weights, gradients, optimizer state and activations, plus the ~0.4 GiB
of Python and torch themselves), or `torch.cuda.max_memory_allocated` on CUDA. File size: the U-Net's
`diffusion_pytorch_model.safetensors` (`save_pretrained`) against the adapter's `pytorch_lora_weights.safetensors`
(`save_lora`), both written after the memory was read.

A run that needs more memory than the machine has free is not started: its row says so (the full fine-tune of the
`base` config holds ~16 bytes per weight, ~14 GB, on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("full", "lora")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "unet"
# AdamW fine-tuning holds weights, gradients and two moments in float32 (16 bytes a weight), plus this much slack.
FULL_BYTES_PER_WEIGHT = 16
HEADROOM_BYTES = 2 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,base", help="names of files in configs/unet/, comma-separated")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent_size", type=int, default=8, help="latent height and width")
    parser.add_argument("--seq_len", type=int, default=16, help="prompt tokens (the demo's tokenizer_max_length)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    # Internal: measure one config and mode in this process and print the numbers as JSON.
    parser.add_argument("--measure", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_unet(name: str, args: argparse.Namespace):
    from latentddpm.models import ConditionalUNet

    torch.manual_seed(args.seed)
    config = ConditionalUNet.load_config(CONFIG_DIR / f"{name}.json")
    return ConditionalUNet.from_config(config, sample_size=args.latent_size)


def measure(name: str, mode: str, args: argparse.Namespace) -> dict:
    """Train the `name` U-Net `mode`'s way in this process; its step time, peak memory, parameters, file size."""
    from latentddpm.config import parse_config
    from latentddpm.configs import config_path
    from latentddpm.lora import UNET_LORA_TARGETS, add_unet_lora, lora_config, save_lora
    from latentddpm.losses import training_loss
    from latentddpm.training.train_ldm import TrainLDMConfig, build_noise_scheduler

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = parse_config(TrainLDMConfig, ["--config", str(config_path("shapes_ldm.yaml"))])
    unet = build_unet(name, args)
    if mode == "lora":
        add_unet_lora(unet, lora_config(args.rank, alpha=None, dropout=0.0, target_modules=UNET_LORA_TARGETS))
    unet.to(args.device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=1e-4, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )
    scheduler, objective = build_noise_scheduler(config), config.objective()
    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, unet.config.in_channels, args.latent_size, args.latent_size, generator=generator)
    hidden = torch.randn(args.batch, args.seq_len, unet.config.cross_attention_dim, generator=generator)
    latents, hidden = latents.to(args.device), hidden.to(args.device)

    def step(i: int) -> None:
        loss, _ = training_loss(unet, scheduler, latents, hidden, None, objective, torch.Generator().manual_seed(i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = args.device.startswith("cuda")
    seconds = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    # ru_maxrss is in KiB on Linux
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as folder:
        if mode == "lora":
            path = save_lora(folder, unet)
        else:
            unet.save_pretrained(folder)
            path = Path(folder) / "diffusion_pytorch_model.safetensors"
        file_bytes = path.stat().st_size
    return {
        "step_seconds": statistics.median(seconds[args.warmup :]),
        "peak_bytes": peak,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in unet.parameters()),
        "file_bytes": file_bytes,
    }


def available_bytes() -> int:
    """Memory the machine can still give (MemAvailable of /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_measurement(name: str, mode: str, args: argparse.Namespace, argv: list[str]) -> dict | str:
    """`measure` in a fresh process: its numbers, or why it was not run."""
    if mode == "full" and not args.device.startswith("cuda"):
        with torch.device("meta"):  # the count alone: no memory, no initialisation
            weights = sum(p.numel() for p in build_unet(name, args).parameters())
        needed, free = weights * FULL_BYTES_PER_WEIGHT + HEADROOM_BYTES, available_bytes()
        if needed > free:
            return f"not run: needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    command = [sys.executable, "-m", "benchmarks.lora", *argv, "--measure", name, mode]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(name: str, results: dict[str, dict | str], rank: int) -> list[str]:
    """The markdown rows comparing the two modes of one config."""
    full, lora = results["full"], results["lora"]
    if isinstance(full, str) or isinstance(lora, str):
        return [f"| {name} | {full if isinstance(full, str) else ''} {lora if isinstance(lora, str) else ''} |"]
    mib = 2**20
    rows = [
        ("step, ms", full["step_seconds"] * 1e3, lora["step_seconds"] * 1e3, "{:.1f}"),
        ("peak memory, MiB", full["peak_bytes"] / mib, lora["peak_bytes"] / mib, "{:.0f}"),
        ("trainable parameters, M", full["trainable"] / 1e6, lora["trainable"] / 1e6, "{:.3f}"),
        ("weights file, MiB", full["file_bytes"] / mib, lora["file_bytes"] / mib, "{:.2f}"),
    ]
    lines = [
        f"| {name} ({full['total'] / 1e6:.1f}M) | full | LoRA rank {rank} | LoRA / full |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, a, b, fmt in rows:
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args)))
        return
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = (
            f"{platform.machine()}, {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} torch threads"
        )
    print(f"command: {' '.join(['python -m benchmarks.lora', *argv])}")
    print(
        f"batch={args.batch} latents={args.latent_size}x{args.latent_size} prompt={args.seq_len} tokens "
        f"steps={args.steps} (+{args.warmup} warm-up) device={args.device} ({device}) torch={torch.__version__}"
    )
    for name in args.configs.split(","):
        results = {mode: run_measurement(name, mode, args, argv) for mode in MODES}
        print()
        print("\n".join(table(name, results, args.rank)))


if __name__ == "__main__":
    main()
