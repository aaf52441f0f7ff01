"""Throughput on one GPU against the best: the `base` U-Net's training step and SD-sized sampling (issue 15, part 3).

Usage:
    python -m benchmarks.gpu                          # on an H100/H200: at most about 8 minutes (--budget 400 s)
    python -m benchmarks.gpu --device cpu --dry-run   # every part, tiny, on CPU in seconds (tests/test_benchmarks.py)
    python -m benchmarks.report --sections gpu        # the same run, rendered into BENCHMARKS.md

Prints the tables (markdown) and writes every figure of the run to `benchmarks/results/gpu.json`.

1. Training, bf16 autocast over float32 weights (accelerate's `mixed_precision: bf16`), the `base` U-Net
   (configs/unet/base.json, Stable Diffusion 1.x's shape), random weights, cached-latent-shaped random inputs
   (4-channel latents, 77 x 768 text states) at 32x32 and 64x64 latents (256 and 512 px), the largest batch that
   fits (doubling from 8 until out of memory, in our eager loop; a loop that does not fit it halves its own):
   - ours: train_ldm's step (`latentddpm.losses.training_loss`: v-prediction, min-SNR-5) on `ConditionalUNet`
     with SDPA attention, channels_last, `torch.compile` and fused AdamW;
   - diffusers: the same weights in `UNet2DConditionModel`, stepped as diffusers' train_text_to_image.py steps
     it (add_noise, get_velocity, min-SNR via compute_snr, MSE, backward, clip_grad_norm_, AdamW, zero_grad), eager.
   images/s from the median step; MFU = images/s x 3 x (FLOPs of one forward per image, counted by
   `torch.utils.flop_counter.FlopCounterMode`) / the GPU's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`, by name).
   Goals: >= 40% MFU at 512 px, >= 1.2x diffusers' images/s.
2. Sampling 512 px (64x64 latents), 50 steps, guidance 7.5, batch 1 and 8, bf16 weights: `LatentDDPMPipeline`
   imported from a `StableDiffusionPipeline` (`benchmarks.sd_sampling`: same U-Net weights, text encoder, VAE and
   scheduler) against that pipeline, eager and with the U-Net channels_last and `torch.compile`d. it/s = steps /
   seconds of the whole call (prompt encoding and decoding included: a lower bound on the loop's rate). Goals: >= 1.0x
   diffusers eager; >= 100 it/s at batch 1 compiled (stable-fast publishes 104.6 on an A100/H100-class GPU).
3. Ablation at 32x32 latents, our loop: every switch off (classic attention processor, contiguous, eager,
   foreach AdamW), each switch alone on, all on.
Peak memory: `torch.cuda.max_memory_allocated` over the timed steps (not measured on CPU).
Parts run in this order and stop at `--budget` seconds (a part left out is marked so); any failure is recorded in
its row rather than ending the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.sd_sampling import PROMPT, build_stable_diffusion
from benchmarks.training import diffusers_loss, ours_loss
from latentddpm.configs import config_path
from latentddpm.losses import Objective
from latentddpm.models import ConditionalUNet
from latentddpm.models.unet_conditional import to_unet2d_condition_config
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import DDPMNoiseScheduler

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
# Peak dense bf16 tensor-core FLOP/s per GPU (vendor data sheets), matched in order against the device name.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
SWITCHES = ("sdpa", "channels_last", "compile", "fused_adamw")
# train_ldm's default objective for a fresh model: cosine betas, v-prediction, min-SNR-5.
NOISE_SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False}
TEXT_TOKENS = 77


@dataclass
class Settings:
    """What one run measures: full size on a GPU, or `--dry-run`'s tiny stand-ins."""

    unet_config: str  # configs/unet/<name>.json
    latent_sizes: tuple[int, ...]  # training latents (height = width)
    max_batch: int  # the batch search stops here
    sample_latent_size: int  # sampling latents (512 px = 64)
    sample_batches: tuple[int, ...]
    sample_steps: int
    warmup: int  # untimed steps (compilation happens in the first)
    steps: int  # timed steps
    compile_backend: str  # torch.compile's; the dry run traces with "eager" (no code generation: seconds, not minutes)
    dtype: torch.dtype  # autocast (training) and weights (sampling); the dry run's float32: CPUs crawl in bf16


FULL = Settings("base", (32, 64), 512, 64, (1, 8), 50, 3, 10, compile_backend="inductor", dtype=torch.bfloat16)
DRY_RUN = Settings("tiny", (4, 8), 2, 2, (1, 2), 2, 1, 2, compile_backend="eager", dtype=torch.float32)


@dataclass
class Row:
    """One measurement; `error` says why there is no number."""

    name: str
    batch: int | None = None
    seconds: float | None = None  # median per step (training) or per call (sampling)
    peak_gib: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: checks every part runs, measures nothing")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds; parts not started by then are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where every figure goes, as JSON")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(median seconds of `step` over `steps` calls after `warmup`, peak GiB allocated during the timed calls)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. Training --------------------------------------------------------------------------------------------------


def training_batch(config, batch: int, size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cached-latent-shaped random inputs: latents and text states (no mask, as Stable Diffusion trains)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=generator).to(device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=generator).to(
            device
        ),
        "encoder_attention_mask": None,
    }


def forward_flops(unet: torch.nn.Module, config, size: int, device: torch.device) -> int:
    """FLOPs of one forward of one image (linear in the batch; the same in any precision)."""
    batch = training_batch(config, 1, size, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(batch["sample"], torch.tensor([500], device=device), batch["encoder_hidden_states"])
    return counter.get_total_flops()


class Weights:
    """The seeded float32 weights of the `settings.unet_config` U-Net, from which every measurement gets a fresh
    copy (ours or diffusers'), made on the device (no compile cache, optimizer state or memory format carried over)."""

    def __init__(self, settings: Settings, device: torch.device):
        torch.manual_seed(0)
        config = ConditionalUNet.load_config(str(config_path(f"unet/{settings.unet_config}.json")))
        ours = ConditionalUNet.from_config(config)
        self.config, self.state, self.device = ours.config, ours.state_dict(), device

    def fresh(self, kind: str) -> torch.nn.Module:
        with torch.device(self.device):
            if kind == "ours":
                unet = ConditionalUNet.from_config(self.config)
            else:
                unet = UNet2DConditionModel(**to_unet2d_condition_config(self.config))
        unet.load_state_dict(self.state)
        return unet


def train_step(
    unet: torch.nn.Module, loss_fn: Callable, batch: dict, device: torch.device, switches: set[str], settings: Settings
) -> Callable[[], None]:
    """One optimizer step of `unet` (a closure) with the `switches` on; the step index seeds its draws."""
    if "sdpa" not in switches:
        unet.set_attn_processor(AttnProcessor())  # the classic processor: softmax(QK^T)V in plain matmuls
    if "channels_last" in switches:
        unet.to(memory_format=torch.channels_last)
        batch = dict(batch, sample=batch["sample"].contiguous(memory_format=torch.channels_last))
    model = torch.compile(unet, backend=settings.compile_backend) if "compile" in switches else unet
    fused = "fused_adamw" in switches and device.type == "cuda"
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=fused, foreach=None if fused else True)
    counter = iter(range(10**9))

    def step() -> None:
        generator = torch.Generator().manual_seed(next(counter))
        with torch.autocast(device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32):
            loss = loss_fn(model, batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def loss_functions() -> dict[str, Callable]:
    schedule = DDPMNoiseScheduler(**NOISE_SCHEDULE).config
    return {
        "ours": partial(ours_loss, scheduler=DDPMNoiseScheduler.from_config(schedule), objective=Objective()),
        "diffusers": partial(
            diffusers_loss, scheduler=DDPMScheduler.from_config(schedule), snr_gamma=Objective().snr_gamma
        ),
    }


def measure_training(
    name: str, make_unet: Callable[[], torch.nn.Module], loss_fn, switches: set[str], batch: int, size: int, args
) -> Row:
    """Median step time of a fresh copy of the U-Net at `batch`, halving the batch on out-of-memory."""
    while batch >= 1:
        unet = make_unet()
        try:
            inputs = training_batch(unet.config, batch, size, args.device)
            step = train_step(unet, loss_fn, inputs, args.device, switches, args.settings)
            seconds, peak = timed(step, args.device, args.settings.warmup, args.settings.steps)
            return Row(name, batch, seconds, peak, {"images_per_s": batch / seconds, "switches": sorted(switches)})
        except Exception as error:  # noqa: BLE001 - a row records any failure; out of memory retries smaller
            if not is_out_of_memory(error):
                return Row(name, batch, error=f"{type(error).__name__}: {str(error)[:200]}")
        finally:
            del unet
            release(args.device)
        batch //= 2
    return Row(name, error="out of memory at batch 1")


def largest_batch(make_unet, loss_fn, size: int, args) -> int:
    """The largest power-of-two batch (from 8, at most `max_batch`) one eager step of ours fits in memory."""
    fits, batch = 0, min(8, args.settings.max_batch)
    while batch <= args.settings.max_batch:
        unet = make_unet()
        try:
            inputs = training_batch(unet.config, batch, size, args.device)
            train_step(unet, loss_fn, inputs, args.device, {"sdpa", "channels_last", "fused_adamw"}, args.settings)()
            fits, batch = batch, batch * 2
        except Exception as error:  # noqa: BLE001
            if not is_out_of_memory(error):
                raise
            break
        finally:
            del unet
            release(args.device)
    return max(fits, 1)


def training(args, weights: Weights, flops_per_image: dict[int, int]) -> list[Row]:
    fresh = weights.fresh
    losses = loss_functions()
    rows = []
    for size in args.settings.latent_sizes:
        if time.perf_counter() - args.start > args.budget:
            rows.append(Row(f"training {size}x{size}", error="skipped: time budget"))
            continue
        unet = fresh("ours")
        flops_per_image[size] = forward_flops(unet, unet.config, size, args.device)
        del unet
        batch = largest_batch(partial(fresh, "ours"), losses["ours"], size, args)
        for kind, switches in (("ours", set(SWITCHES)), ("diffusers", {"sdpa"})):
            name = f"{kind} {size}x{size}"
            row = measure_training(name, partial(fresh, kind), losses[kind], switches, batch, size, args)
            row.extra["latent_size"] = size
            rows.append(row)
    return rows


def ablation(args, weights: Weights) -> list[Row]:
    size = args.settings.latent_sizes[0]
    fresh = partial(weights.fresh, "ours")
    loss_fn = loss_functions()["ours"]
    batch = largest_batch(fresh, loss_fn, size, args)
    variants = {"all off": set()} | {f"{s} alone": {s} for s in SWITCHES} | {"all on": set(SWITCHES)}
    rows = []
    for name, switches in variants.items():
        if time.perf_counter() - args.start > args.budget:
            rows.append(Row(name, error="skipped: time budget"))
            continue
        row = measure_training(name, fresh, loss_fn, switches, batch, size, args)
        row.extra["latent_size"] = size
        rows.append(row)
    return rows


# --- 2. Sampling --------------------------------------------------------------------------------------------------


def sampling(args) -> list[Row]:
    settings, device = args.settings, args.device
    original = build_stable_diffusion(settings.unet_config)
    original.to(device, settings.dtype)
    imported = LatentDDPMPipeline.from_stable_diffusion(original)
    imported.set_progress_bar_config(disable=True)
    pipelines = {"diffusers StableDiffusionPipeline": original, "ours LatentDDPMPipeline": imported}
    size = settings.sample_latent_size * original.vae_scale_factor
    rows = []
    for compiled in (False, True):
        if compiled:
            for pipe in pipelines.values():
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.unet = torch.compile(pipe.unet, backend=settings.compile_backend)
        for batch in settings.sample_batches:
            for name, pipe in pipelines.items():
                label = f"{name}, batch {batch}, {'compiled' if compiled else 'eager'}"
                if time.perf_counter() - args.start > args.budget:
                    rows.append(Row(label, batch, error="skipped: time budget"))
                    continue

                def call(pipe=pipe, batch=batch) -> None:
                    pipe(
                        [PROMPT] * batch,
                        height=size,
                        width=size,
                        num_inference_steps=settings.sample_steps,
                        guidance_scale=7.5,
                        generator=torch.Generator(device).manual_seed(0),
                        output_type="pt",
                    )

                try:
                    seconds, peak = timed(call, device, 1, max(1, settings.steps // 4))
                    rows.append(Row(label, batch, seconds, peak, {"it_per_s": settings.sample_steps / seconds}))
                except Exception as error:  # noqa: BLE001
                    rows.append(Row(label, batch, error=f"{type(error).__name__}: {str(error)[:200]}"))
                release(device)
    return rows


# --- Report -------------------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def training_table(rows: list[Row], flops_per_image: dict[int, int], peak: float | None) -> list[str]:
    lines = [
        "| loop | latents | batch | images/s | MFU | peak GiB | vs diffusers |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_name = {row.name: row for row in rows}
    for row in rows:
        size = row.extra.get("latent_size")
        if row.error:
            lines.append(f"| {row.name} | {size or ''} | {row.batch or ''} | {row.error} | | | |")
            continue
        images = row.extra["images_per_s"]
        mfu = images * 3 * flops_per_image[size] / peak if peak and size in flops_per_image else None
        row.extra["mfu"] = mfu
        twin = by_name.get(f"diffusers {size}x{size}")
        ratio = images / twin.extra["images_per_s"] if twin and not twin.error and row is not twin else None
        lines.append(
            f"| {row.name} | {size}x{size} | {row.batch} | {images:.1f} | {fmt(mfu and 100 * mfu, '.1f')} % | "
            f"{fmt(row.peak_gib, '.1f')} | {fmt(ratio, '.2f')}{'x' if ratio else ''} |"
        )
    return lines


def sampling_table(rows: list[Row]) -> list[str]:
    lines = ["| pipeline | it/s | s / call | peak GiB |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name} | {row.error} | | |")
        else:
            lines.append(
                f"| {row.name} | {row.extra['it_per_s']:.1f} | {row.seconds:.3f} | {fmt(row.peak_gib, '.1f')} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = torch.device(args.device)
    args.settings = DRY_RUN if args.dry_run else FULL
    args.start = time.perf_counter()
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what fp32 leftovers (the optimizer, the loss) run as
    flops_per_image: dict[int, int] = {}
    weights = Weights(args.settings, args.device)
    train_rows = training(args, weights, flops_per_image)
    sample_rows = sampling(args)
    ablation_rows = ablation(args, weights)
    peak = peak_flops(args.device)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    lines = [
        f"Device: {device_name}; peak dense bf16 {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; U-Net "
        f"`{args.settings.unet_config}`, forward GFLOPs per image "
        + ", ".join(f"{s}x{s}: {f / 1e9:.4g}" for s, f in flops_per_image.items())
        + f"; {time.perf_counter() - args.start:.0f} s in all"
        + (" (dry run: tiny stand-ins, no meaningful numbers)." if args.dry_run else "."),
        "",
        f"Training ({args.settings.dtype} autocast):",
        "",
        *training_table(train_rows, flops_per_image, peak),
        "",
        f"Sampling ({args.settings.sample_latent_size * 8} px, {args.settings.sample_steps} steps, "
        f"{args.settings.dtype}):",
        "",
        *sampling_table(sample_rows),
        "",
        f"Ablation (our loop, {args.settings.latent_sizes[0]}x{args.settings.latent_sizes[0]} latents):",
        "",
        *training_table(ablation_rows, flops_per_image, peak),
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figures = {
        "device": device_name,
        "peak_bf16_flops": peak,
        "dry_run": args.dry_run,
        "settings": asdict(args.settings) | {"dtype": str(args.settings.dtype)},
        "forward_flops_per_image": flops_per_image,
        "training": [asdict(r) for r in train_rows],
        "sampling": [asdict(r) for r in sample_rows],
        "ablation": [asdict(r) for r in ablation_rows],
        "seconds": time.perf_counter() - args.start,
    }
    args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
