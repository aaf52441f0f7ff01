"""Speed and peak memory of a train_ldm step against the same loop on diffusers' parts, and what latent caching saves.

Usage:
    python -m benchmarks.training [--steps 20] [--batch 128] [--device cpu|cuda] [--dtype fp32|bf16] [--threads 1]

The setup is the demo's, read from configs/shapes_ldm.yaml (noise schedule, objective, optimizer, EMA, prompt length)
and configs/shapes_vae.yaml (the VAE), with the `--config` U-Net (configs/unet/small.json by default). Weights are
random: the cost does not depend on them. `--dtype bf16` runs the step under `torch.autocast` with float32 weights,
as `--mixed_precision bf16` does in train_ldm.

One training step, in both loops: noise and timesteps drawn from the step's generator, x_t and the v-prediction
target from the scheduler, U-Net forward, min-SNR-gamma weighted MSE, backward, gradient clipping, AdamW step, EMA
step.

(a) ours vs diffusers, on the same batch (latents, text states and mask) and the same draws (noise, timesteps):
    - ours: `ConditionalUNet` + `DDPMNoiseScheduler` + `latentddpm.losses.training_loss`, the mean of the per-sample
      `training_losses` that train_ldm's step calls;
    - diffusers: the `UNet2DConditionModel` of `to_unet2d_condition_config` with the same weights + `DDPMScheduler`
      with the same schedule, x_t from `add_noise`, the target from `get_velocity` and min-SNR from
      `diffusers.training_utils.compute_snr`, as diffusers' examples/text_to_image/train_text_to_image.py does.
    Time: one process, both warmed up, then alternating step by step (which goes first also alternates); medians.
    Peak memory: `benchmarks.unet.peak_allocated` over one step after the warm-up (CUDA: max_memory_allocated; CPU:
    the running sum of the allocations and frees that torch.profiler records), above what was allocated before it.

(b) latent caching, our step on fresh batches of the shapes dataset: the rows' latents and text embeddings from a
    `LatentCache` (`LatentCache.draw` and `LatentCache.text`: a posterior sample from the cached moments, caption
    dropout, cached prompt states), as train_ldm does, against encoding every batch on the fly with the VAE
    (`encode_images`) and the text encoder (`encode_prompt`), under the same autocast as the step. The images are
    decoded and transformed to pixels once beforehand, so the on-the-fly time leaves out image decoding and the
    speed-up is a lower bound. Alternating step by step; medians. "data per step" is the part of a step before the
    U-Net step starts.

On a CPU shared with other jobs pass `--threads 1`: with more threads than idle cores, OpenMP barriers make step
times swing by up to 10x.
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import logging
from transformers.utils import logging as transformers_logging

from benchmarks.unet import build_models, make_batch, peak_allocated, synchronize
from latentddpm.batching import ShuffledStream, step_generator
from latentddpm.cache import LatentCache, build_latent_cache, finish_latent_cache
from latentddpm.config import parse_config
from latentddpm.configs import config_path
from latentddpm.data.shapes import make_shapes_dataset
from latentddpm.data.transforms import ImageTransform
from latentddpm.latents import encode_images, scale_latents, vae_scale_factor
from latentddpm.losses import Objective, training_loss
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder
from latentddpm.training.train_ldm import TrainLDMConfig, build_noise_scheduler
from latentddpm.training.train_vae import TrainVAEConfig, build_vae

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
Batch = dict[str, torch.Tensor]  # the keyword names of the U-Net's forward
LossFn = Callable[[torch.nn.Module, Batch, torch.Generator], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="name of a file in configs/unet/ (without .json)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (the demo's train_batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(AUTOCAST_DTYPES), help="autocast precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, default=0, help="also print the N ops that differ most in self time")
    return parser.parse_args(argv)


def autocast(args: argparse.Namespace) -> torch.autocast:
    dtype = AUTOCAST_DTYPES[args.dtype]
    return torch.autocast(torch.device(args.device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def ours_loss(
    unet, batch: Batch, generator: torch.Generator, scheduler: DDPMNoiseScheduler, objective: Objective
) -> torch.Tensor:
    """train_ldm's loss: `training_loss` itself."""
    hidden, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    return training_loss(unet, scheduler, batch["sample"], hidden, mask, objective, generator)[0]


def diffusers_loss(
    unet, batch: Batch, generator: torch.Generator, scheduler: DDPMScheduler, snr_gamma: float | None
) -> torch.Tensor:
    """The v-prediction loss of diffusers' train_text_to_image.py, its min-SNR weighting included; noise and
    timesteps drawn from `generator` as `training_loss` draws them, so both loops see the same values."""
    latents = batch["sample"]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(
        noisy_latents,
        timesteps,
        batch["encoder_hidden_states"],
        encoder_attention_mask=batch["encoder_attention_mask"],
        return_dict=False,
    )[0]
    mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return mse.mean()
    snr = compute_snr(scheduler, timesteps)
    return (mse * torch.clamp(snr, max=snr_gamma) / (snr + 1)).mean()


def make_train_step(
    unet: torch.nn.Module, loss_fn: LossFn, config: TrainLDMConfig, args: argparse.Namespace
) -> Callable[[Batch, torch.Generator], None]:
    """A closure running one optimizer step of `unet` on a batch, with its own AdamW and EMA set up as in train_ldm."""
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, power=config.ema_power)
    ema.to(args.device)

    def step(batch: Batch, generator: torch.Generator) -> None:
        with autocast(args):
            loss = loss_fn(unet, batch, generator)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return step


def median_seconds(steps: dict[str, Callable[[int], None]], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of `steps[name](i)` over `args.steps` calls after `args.warmup`, interleaved call by call."""
    for i in range(args.warmup):
        for step in steps.values():
            step(i)
    synchronize(args.device)
    names = list(steps)
    times = {name: [] for name in names}
    for i in range(args.warmup, args.warmup + args.steps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name](i)
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def schedule(config: TrainLDMConfig) -> dict:
    """The noise schedule and target, in the argument names both DDPMNoiseScheduler and DDPMScheduler take."""
    return build_noise_scheduler(config).config


def compare_with_diffusers(
    models: dict[str, torch.nn.Module], batch: Batch, config: TrainLDMConfig, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """(a): median seconds per step and peak allocated bytes of our loop and diffusers', on one fixed batch."""
    loss_fns = {
        "ours": partial(
            ours_loss, scheduler=DDPMNoiseScheduler.from_config(schedule(config)), objective=config.objective()
        ),
        "diffusers": partial(
            diffusers_loss, scheduler=DDPMScheduler.from_config(schedule(config)), snr_gamma=config.snr_gamma
        ),
    }
    train_steps = {name: make_train_step(models[name], loss_fns[name], config, args) for name in models}

    def on_the_batch(step: Callable[[Batch, torch.Generator], None]) -> Callable[[int], None]:
        def run(i: int) -> None:
            step(batch, step_generator(args.seed, i))

        return run

    seconds = median_seconds({name: on_the_batch(step) for name, step in train_steps.items()}, args)
    peak = {name: peak_allocated(partial(on_the_batch(step), 0), args.device) for name, step in train_steps.items()}
    if args.profile:
        print_profile_difference({name: partial(on_the_batch(step), 0) for name, step in train_steps.items()}, args)
    return {"seconds": seconds, "peak_allocated": peak}


def print_profile_difference(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> None:
    """Self time per op over 3 steps of each loop (torch.profiler), the `args.profile` ops that differ most."""
    self_ms = {}
    for name, step in steps.items():
        with torch.profiler.profile() as profiler:
            for _ in range(3):
                step()
            synchronize(args.device)
        self_ms[name] = {e.key: e.self_cpu_time_total / 3e3 for e in profiler.key_averages()}
    ops = set(self_ms["ours"]) | set(self_ms["diffusers"])
    diff = {op: self_ms["ours"].get(op, 0.0) - self_ms["diffusers"].get(op, 0.0) for op in ops}
    print(f"{'op (self CPU ms per step)':<48} {'ours':>9} {'diffusers':>9} {'ours - diffusers':>17}")
    for op in sorted(ops, key=lambda op: -abs(diff[op]))[: args.profile]:
        ours, theirs = self_ms["ours"].get(op, 0.0), self_ms["diffusers"].get(op, 0.0)
        print(f"{op[:48]:<48} {ours:>9.2f} {theirs:>9.2f} {diff[op]:>17.2f}")
    ours, theirs = (sum(self_ms[name].values()) for name in ("ours", "diffusers"))
    print(f"{'total':<48} {ours:>9.2f} {theirs:>9.2f} {ours - theirs:>17.2f}")


def compare_caching(
    unet: torch.nn.Module, config: TrainLDMConfig, vae_config: TrainVAEConfig, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """(b): median seconds per step, and of its data part, with cached latents and text embeddings and without."""
    device = args.device
    tokenizer, text_encoder = load_text_encoder(config.text_encoder or default_text_encoder_path())
    tokenizer.model_max_length = config.tokenizer_max_length
    text_encoder.to(device).requires_grad_(False)
    vae = build_vae(vae_config).to(device).eval().requires_grad_(False)
    expected = {
        "in_channels": vae.config.latent_channels,
        "sample_size": config.resolution // vae_scale_factor(vae),
        "cross_attention_dim": text_encoder.config.hidden_size,
    }
    got = {key: unet.config[key] for key in expected}
    if got != expected:
        raise ValueError(f"--config {args.config!r} has {got}; the shapes VAE and text encoder need {expected}.")

    # Four batches' worth of images: the data path does not get slower with more, only the cache build does.
    dataset = make_shapes_dataset(num_images=4 * args.batch, size=config.resolution, seed=args.seed)
    transform = ImageTransform(config.resolution, center_crop=config.center_crop)
    folder = tempfile.mkdtemp(prefix="benchmark-cache-")
    build_latent_cache(
        dataset,
        folder,
        image_column="image",
        caption_column="text",
        transform=transform,
        vae=vae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        random_flip=False,
        batch_size=config.dataloader_batch_size,
        device=device,
        show_progress=False,
        seed=args.seed,
    )
    finish_latent_cache(folder)
    cache = LatentCache(folder)  # the default float16 storage: what train_ldm reads
    pixels = torch.stack([transform(image) for image in dataset["image"]])
    captions = dataset["text"]
    stream = ShuffledStream(len(dataset), args.batch, seed=args.seed)
    loss_fn = partial(
        ours_loss, scheduler=DDPMNoiseScheduler.from_config(schedule(config)), objective=config.objective()
    )
    train_step = make_train_step(unet, loss_fn, config, args)
    data_seconds = {"cached": [], "on the fly": []}

    def train_on(name: str, i: int, start: float, latents, hidden, mask, generator: torch.Generator) -> None:
        batch = {"sample": latents, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        batch = {key: value.to(device) for key, value in batch.items()}
        synchronize(device)
        if i >= args.warmup:
            data_seconds[name].append(time.perf_counter() - start)
        train_step(batch, generator)

    def cached(i: int) -> None:
        start = time.perf_counter()
        generator = step_generator(args.seed, i)
        drawn = cache.draw(stream.indices(i), generator, caption_dropout=config.caption_dropout)
        latents = scale_latents(vae, drawn["latents"])
        train_on("cached", i, start, latents, *cache.text(drawn["caption_ids"]), generator)

    def on_the_fly(i: int) -> None:
        start = time.perf_counter()
        generator = step_generator(args.seed, i)
        rows = stream.indices(i).tolist()
        dropped = (torch.rand(len(rows), generator=generator) < config.caption_dropout).tolist()
        # Caption dropout to the empty prompt, as LatentCache.draw does with its cached empty-prompt row.
        prompts = ["" if drop else captions[row] for row, drop in zip(rows, dropped)]
        with torch.no_grad(), autocast(args):
            latents = encode_images(vae, pixels[rows].to(device), generator)
            hidden, mask = encode_prompt(prompts, tokenizer, text_encoder, device=device)
        train_on("on the fly", i, start, latents.float(), hidden.float(), mask, generator)

    seconds = median_seconds({"cached": cached, "on the fly": on_the_fly}, args)
    shutil.rmtree(folder)
    return {"seconds": seconds, "data_seconds": {name: statistics.median(v) for name, v in data_seconds.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.set_verbosity_error()  # not the "modules that should be kept in float32: []" notice of `.to(dtype)`
    transformers_logging.disable_progress_bar()  # nor the text encoder's "Loading weights" bar
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = parse_config(TrainLDMConfig, ["--config", str(config_path("shapes_ldm.yaml"))])
    vae_config = parse_config(TrainVAEConfig, ["--config", str(config_path("shapes_vae.yaml"))])

    # benchmarks.unet's helpers build float32 models and inputs (`--dtype` is the autocast precision here, not the
    # weights' dtype as there), with prompts as long as the demo's.
    unet_args = argparse.Namespace(**vars(args) | {"dtype": "fp32", "seq_len": config.tokenizer_max_length})
    models = build_models(unet_args)
    batch = make_batch(models["ours"].config, unet_args)
    params = sum(p.numel() for p in models["ours"].parameters())
    a = compare_with_diffusers(models, batch, config, args)
    del models["diffusers"]
    b = compare_caching(models["ours"], config, vae_config, args)

    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    command = " ".join(["python -m benchmarks.training", *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}")
    print(
        f"U-Net config={args.config} ({params / 1e6:.2f}M parameters) batch={args.batch} steps={args.steps} "
        f"device={args.device} ({device}) autocast={args.dtype} torch={torch.__version__}"
    )
    print()
    print("| (a) training step | ours | diffusers | ours/diffusers |")
    print("| --- | ---: | ---: | ---: |")
    ours, theirs = a["seconds"]["ours"], a["seconds"]["diffusers"]
    print(f"| step, ms | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {ours / theirs:.3f} |")
    print(f"| images/s | {args.batch / ours:.1f} | {args.batch / theirs:.1f} | {theirs / ours:.3f} |")
    ours, theirs = a["peak_allocated"]["ours"], a["peak_allocated"]["diffusers"]
    print(f"| peak allocated, MiB | {ours / 2**20:.1f} | {theirs / 2**20:.1f} | {ours / theirs:.3f} |")
    print()
    print("| (b) latent caching | cached | on the fly | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    cached, fly = b["data_seconds"]["cached"], b["data_seconds"]["on the fly"]
    print(f"| data per step, ms | {cached * 1e3:.1f} | {fly * 1e3:.1f} | {fly / cached:.1f} |")
    cached, fly = b["seconds"]["cached"], b["seconds"]["on the fly"]
    print(f"| step with its data, ms | {cached * 1e3:.1f} | {fly * 1e3:.1f} | {fly / cached:.3f} |")
    print(f"| images/s | {args.batch / cached:.1f} | {args.batch / fly:.1f} | {fly / cached:.3f} |")


if __name__ == "__main__":
    main()
