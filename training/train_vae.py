"""Stage 1: train the autoencoder (a diffusers `AutoencoderKL`) that maps images to latents.

Usage:
    accelerate launch training/train_vae.py --config configs/shapes_vae.yaml [--key value ...]
    latentddpm train-vae --config configs/shapes_vae.yaml [--key value ...]

Loss: L1 or L2 reconstruction + `kl_weight` * KL to N(0, I), as in the LDM paper's KL-regularised autoencoder, plus
optionally (`gan_weight > 0`) the hinge loss of a patch discriminator trained alongside from `gan_start_step` on, as
LDM's autoencoders do. (LPIPS needs pretrained VGG weights, which cannot be fetched offline: not used.)
At the end the latent std over a data sample sets `scaling_factor = 1 / std` in the saved config (LDM's
`scale_by_std`), and `shift_factor` = the latent mean when `compute_shift_factor`, so that the scaled latents the
diffusion model sees have mean 0 and std 1 whatever the autoencoder learned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from latentddpm.batching import ShuffledStream, step_generator
from latentddpm.config import (
    ConfigError,
    DataConfig,
    config_to_dict,
    non_negative,
    parse_config,
    positive,
    save_config,
    tracker_config,
)
from latentddpm.data.images import prepare_image_dataset
from latentddpm.data.transforms import ImageTransform
from latentddpm.eval.reconstruction import psnr
from latentddpm.manifest import build_manifest, write_manifest
from latentddpm.models.discriminator import PatchDiscriminator
from latentddpm.runs import LR_SCHEDULERS, TrainingRun, find_checkpoint, start_run

logger = get_logger(__name__)


@dataclass
class TrainVAEConfig(DataConfig):
    # --- model (diffusers AutoencoderKL) ---
    block_out_channels: list[int] = (32, 64, 64)  # one entry per level; down-sampling factor = 2^(levels - 1)
    layers_per_block: int = positive(1)  # ResNet blocks per level
    latent_channels: int = positive(4)  # channels of the latent image
    norm_num_groups: int = positive(16)  # GroupNorm groups (must divide every block width)
    mid_block_add_attention: bool = False  # attention in the mid block (slow on CPU, little gain at 32x32)
    # --- objective ---
    reconstruction_loss: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    kl_weight: float = non_negative(1e-6)  # weight of KL(q(z|x) || N(0, I)), per latent element vs per pixel
    gan_weight: float = non_negative(0.0)  # weight of the patch-GAN generator loss (0 = no discriminator)
    gan_start_step: int = non_negative(0)  # train and use the discriminator from this step on (LDM's `disc_start`)
    discriminator_channels: int = positive(64)  # width of the discriminator's first layer (divisible by 8)
    discriminator_layers: int = positive(3)  # its stride-2 layers (3 for 32x32 images and up)
    # --- optimisation ---
    train_batch_size: int = positive(64)  # per process
    max_train_steps: int = positive(2000)  # optimizer steps
    learning_rate: float = positive(1e-3)  # peak learning rate
    lr_scheduler: str = "cosine"  # diffusers get_scheduler name
    lr_warmup_steps: int = non_negative(50)  # warmup steps
    adam_weight_decay: float = non_negative(0.0)
    max_grad_norm: float | None = positive(1.0)  # gradient clipping (None = off)
    max_consecutive_nonfinite: int = positive(5)  # stop after this many skipped steps in a row with NaN/inf gradients
    # autocast precision; None = accelerate's (`accelerate launch --mixed_precision`, `accelerate config`, else "no")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    torch_threads: int | None = positive(None)  # torch.set_num_threads on CPU (None = torch default)
    # With torch_threads None, on CPU: fewer threads than cores when other processes keep cores busy (measured at
    # start, logged; latentddpm.threads). Off by default: results then depend on the machine's load, bit for bit.
    adapt_torch_threads: bool = False
    # --- latent scaling, evaluation, output ---
    scale_samples: int = positive(2048)  # images encoded to measure the latent mean/std for scaling_factor
    compute_shift_factor: bool = True  # also centre the latents (shift_factor = latent mean)
    num_validation_samples: int = non_negative(256)  # held-out images for PSNR (not trained on; 0 = no PSNR)
    output_dir: str = "outputs/shapes_vae"  # the VAE is saved here; checkpoints in output_dir/checkpoints
    seed: int = 0  # seeds init, data order and every random draw
    checkpointing_steps: int = non_negative(0)  # save a checkpoint every N steps (0 = never)
    checkpoints_total_limit: int | None = positive(2)  # keep at most N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    log_every: int = positive(50)  # log every N steps

    def validate(self) -> None:
        if self.discriminator_channels % 8:
            raise ConfigError(
                f"Config key 'discriminator_channels' must be divisible by 8, got {self.discriminator_channels}."
            )
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ConfigError(f"Config key 'block_out_channels' must be widths > 0, got {self.block_out_channels}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"Config key 'lr_scheduler' must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"Config key 'norm_num_groups'={self.norm_num_groups} must divide every block_out_channels "
                f"entry; {bad} are not divisible."
            )


class AutoencoderLoss(torch.nn.Module):
    """Encode, sample the posterior, decode, in one `forward`, so DDP sees (and all-reduces) the whole graph."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the reconstruction `(B, 3, H, W)` and the KL to N(0, I) per latent element `(B,)`."""
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return reconstruction, posterior.kl() / posterior.mean[0].numel()


def build_vae(config: TrainVAEConfig) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL of the size `config` names."""
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_block_add_attention,
    )


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TrainVAEConfig, argv)
    output_dir = Path(config.output_dir)
    checkpoint = find_checkpoint(config)  # before any data is loaded: a wrong path fails in seconds
    accelerator = start_run(config)

    # 1. Data: decode, check and convert every image once; hold out the last rows for PSNR.
    dataset = config.load_dataset(config.seed)
    fingerprint = dataset._fingerprint  # of the data as loaded, like train_ldm's manifest
    dataset, report = prepare_image_dataset(dataset, config.image_column, min_size=config.min_image_size)
    logger.info(f"Data: {report}")
    transform = ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=config.random_flip)
    num_rows = len(dataset) - config.num_validation_samples
    if num_rows <= 0:
        raise ConfigError(f"num_validation_samples={config.num_validation_samples} leaves no training images.")
    validation_images = dataset[num_rows:][config.image_column]
    stream = ShuffledStream(num_rows, config.train_batch_size, accelerator.num_processes, seed=config.seed)

    def load_pixels(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = dataset[rows.tolist()][config.image_column]
        return torch.stack([transform(image, generator=generator) for image in images])

    # 2. Model and optimizer.
    levels = len(config.block_out_channels)
    vae = build_vae(config)
    logger.info(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(AutoencoderLoss(vae), optimizer, lr_scheduler)
    discriminator = discriminator_optimizer = None
    if config.gan_weight > 0:
        discriminator = PatchDiscriminator(3, config.discriminator_channels, config.discriminator_layers)
        discriminator_optimizer = torch.optim.AdamW(
            discriminator.parameters(),
            lr=config.learning_rate,
            betas=(0.5, 0.9),
            weight_decay=config.adam_weight_decay,
        )
        discriminator, discriminator_optimizer = accelerator.prepare(discriminator, discriminator_optimizer)
    latent_shape = (
        config.latent_channels,
        config.resolution // 2 ** (levels - 1),
        config.resolution // 2 ** (levels - 1),
    )

    # 3. Resume.
    manifest = build_manifest(config_to_dict(config), config.seed, fingerprint)

    def write_extra(folder: Path) -> None:  # what a checkpoint holds besides accelerate's states
        save_config(config, folder / "train_config.yaml")
        write_manifest(manifest, folder)

    run = TrainingRun(accelerator, config, write_extra)
    run.resume(checkpoint)
    if accelerator.is_main_process:
        accelerator.init_trackers("latentddpm-vae", config=tracker_config(config))

    # 4. The loop.
    state, device = run.state, accelerator.device
    progress = tqdm(
        total=config.max_train_steps,
        initial=state.global_step,
        desc="VAE steps",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    with run:  # SIGTERM/SIGINT: finish the step, checkpoint, raise Preempted
        while state.global_step < config.max_train_steps:
            step_start = time.perf_counter()
            generator = step_generator(config.seed, state.global_step, accelerator.process_index)
            pixels = load_pixels(stream.indices(state.global_step, accelerator.process_index), generator).to(device)
            eps = torch.randn((pixels.shape[0], *latent_shape), generator=generator).to(device)
            with accelerator.autocast():
                reconstruction, kl = model(pixels, eps)
            reconstruction = reconstruction.float()
            if config.reconstruction_loss == "l1":
                rec_loss = F.l1_loss(reconstruction, pixels)
            else:
                rec_loss = F.mse_loss(reconstruction, pixels)
            kl_loss = kl.mean()
            loss = rec_loss + config.kl_weight * kl_loss
            adversarial = discriminator is not None and state.global_step >= config.gan_start_step
            if adversarial:
                with accelerator.autocast():
                    generator_loss = -discriminator(reconstruction).float().mean()  # hinge GAN, generator side
                loss = loss + config.gan_weight * generator_loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            if run.should_step(grad_norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if adversarial:
                discriminator_optimizer.zero_grad(set_to_none=True)  # drop what the generator loss left there
                with accelerator.autocast():
                    real = discriminator(pixels).float()
                    fake = discriminator(reconstruction.detach()).float()
                discriminator_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                accelerator.backward(discriminator_loss)
                discriminator_optimizer.step()
                discriminator_optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            state.global_step += 1
            state.train_seconds += time.perf_counter() - step_start
            progress.update(1)
            if state.global_step % config.log_every == 0 or state.global_step == config.max_train_steps:
                logs = {"rec_loss": rec_loss.item(), "kl": kl_loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
                if adversarial:
                    logs |= {"generator_loss": generator_loss.item(), "discriminator_loss": discriminator_loss.item()}
                progress.set_postfix(rec=f"{logs['rec_loss']:.4f}", kl=f"{logs['kl']:.1f}")
                accelerator.log(logs, step=state.global_step)
            run.checkpoint_if_due()
    progress.close()

    # 5. Held-out PSNR, data-derived latent scaling, save.
    accelerator.wait_for_everyone()
    vae = accelerator.unwrap_model(model).vae.eval()
    metrics = {}
    if accelerator.is_main_process:
        with torch.no_grad():
            if validation_images:
                val = torch.stack([transform(image) for image in validation_images]).to(device)
                reconstruction = vae(val, sample_posterior=False).sample.float().clamp(-1, 1)
                metrics["psnr"] = psnr(reconstruction, val, data_range=2.0).mean().item()
            rows = torch.arange(min(config.scale_samples, num_rows))
            latents = torch.cat(
                [
                    vae.encode(
                        load_pixels(chunk, torch.Generator().manual_seed(config.seed)).to(device)
                    ).latent_dist.sample(torch.Generator(device).manual_seed(config.seed))
                    for chunk in rows.split(256)
                ]
            ).float()
        # LDM's scale_by_std: unit-variance latents for the diffusion model (Rombach et al. 2022, sec. 3.1 / G).
        metrics["latent_mean"], metrics["latent_std"] = latents.mean().item(), latents.std().item()
        vae.register_to_config(
            scaling_factor=1.0 / metrics["latent_std"],
            shift_factor=metrics["latent_mean"] if config.compute_shift_factor else None,
        )
        vae.save_pretrained(str(output_dir))
        save_config(config, output_dir / "train_config.yaml")
        write_manifest(manifest | {"final_metrics": metrics, "skipped_steps": state.skipped_steps}, output_dir)
        accelerator.log({k: v for k, v in metrics.items() if k == "psnr"}, step=state.global_step)
        held_out = f"held-out PSNR {metrics['psnr']:.2f} dB, " if "psnr" in metrics else ""
        accelerator.print(
            f"VAE saved to {output_dir}: {held_out}latent mean {metrics['latent_mean']:.4f}, std "
            f"{metrics['latent_std']:.4f} -> scaling_factor {vae.config.scaling_factor:.4f}"
        )
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    from latentddpm.cli import run_main

    run_main(main)
