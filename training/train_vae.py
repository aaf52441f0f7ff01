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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from latentddpm.batching import ShuffledStream, step_generator
from latentddpm.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint, stop_on_signals
from latentddpm.config import (
    ConfigError,
    DataConfig,
    check_ranges,
    config_to_dict,
    parse_config,
    save_config,
    tracker_config,
)
from latentddpm.data.images import prepare_image_dataset
from latentddpm.data.transforms import ImageTransform
from latentddpm.manifest import build_manifest, write_manifest
from latentddpm.models.discriminator import PatchDiscriminator
from latentddpm.nonfinite import NonFiniteGuard
from latentddpm.runs import start_run

logger = get_logger(__name__)
LR_SCHEDULERS = [s.value for s in SchedulerType]


@dataclass
class TrainVAEConfig(DataConfig):
    # --- model (diffusers AutoencoderKL) ---
    block_out_channels: list[int] = (32, 64, 64)  # one entry per level; down-sampling factor = 2^(levels - 1)
    layers_per_block: int = 1  # ResNet blocks per level
    latent_channels: int = 4  # channels of the latent image
    norm_num_groups: int = 16  # GroupNorm groups (must divide every block width)
    mid_block_add_attention: bool = False  # attention in the mid block (slow on CPU, little gain at 32x32)
    # --- objective ---
    reconstruction_loss: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)), per latent element vs per pixel reconstruction
    gan_weight: float = 0.0  # weight of the patch-GAN generator loss (0 = no discriminator)
    gan_start_step: int = 0  # train and use the discriminator from this step on (LDM's `disc_start`)
    discriminator_channels: int = 64  # width of the discriminator's first layer (divisible by 8)
    discriminator_layers: int = 3  # its stride-2 layers (3 for 32x32 images and up)
    # --- optimisation ---
    train_batch_size: int = 64  # per process
    max_train_steps: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    lr_scheduler: str = "cosine"  # diffusers get_scheduler name
    lr_warmup_steps: int = 50  # warmup steps
    adam_weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # gradient clipping (None = off)
    max_consecutive_nonfinite: int = 5  # stop after this many skipped steps in a row with NaN/inf gradients
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision
    torch_threads: int | None = None  # torch.set_num_threads on CPU (None = torch default)
    # --- latent scaling, evaluation, output ---
    scale_samples: int = 2048  # images encoded to measure the latent mean/std for scaling_factor
    compute_shift_factor: bool = True  # also centre the latents (shift_factor = latent mean)
    num_validation_samples: int = 256  # held-out images for PSNR (not trained on)
    output_dir: str = "outputs/shapes_vae"  # the VAE is saved here; checkpoints in output_dir/checkpoints
    seed: int = 0  # seeds init, data order and every random draw
    checkpointing_steps: int = 0  # save a checkpoint every N steps (0 = never)
    checkpoints_total_limit: int | None = 2  # keep at most N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    log_every: int = 50  # log every N steps

    def validate(self) -> None:
        super().validate()
        check_ranges(
            self,
            positive=(
                "layers_per_block",
                "latent_channels",
                "norm_num_groups",
                "train_batch_size",
                "max_train_steps",
                "learning_rate",
                "max_grad_norm",
                "torch_threads",
                "scale_samples",
                "checkpoints_total_limit",
                "log_every",
                "max_consecutive_nonfinite",
                "discriminator_channels",
                "discriminator_layers",
            ),
            non_negative=(
                "kl_weight",
                "gan_weight",
                "gan_start_step",
                "lr_warmup_steps",
                "adam_weight_decay",
                "num_validation_samples",
                "checkpointing_steps",
            ),
        )
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


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]. Shapes `(B, 3, H, W)` -> `(B,)`."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).mean(dim=(1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(1e-10))


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TrainVAEConfig, argv)
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    # Before any data is loaded, so that a wrong path fails in seconds.
    checkpoint = resolve_checkpoint(checkpoint_dir, config.resume_from_checkpoint)
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
    validation_pixels = torch.stack([transform(im) for im in dataset[num_rows:][config.image_column]])
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

    global_step, skipped_steps = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        global_step, skipped_steps = state["global_step"], state["skipped_steps"]
        logger.info(f"Resumed from {checkpoint} at step {global_step}")
    guard = NonFiniteGuard(config.max_consecutive_nonfinite, checkpoint_dir, skipped=skipped_steps)

    manifest = build_manifest(config_to_dict(config), config.seed, fingerprint)

    def write_extra(folder: Path) -> None:
        save_config(config, folder / "train_config.yaml")
        write_manifest(manifest, folder)

    def checkpoint_now() -> Path:
        return save_checkpoint(
            accelerator,
            checkpoint_dir,
            global_step,
            {"global_step": global_step, "skipped_steps": guard.skipped},
            write_extra=write_extra,
            total_limit=config.checkpoints_total_limit,
        )

    if accelerator.is_main_process:
        accelerator.init_trackers("latentddpm-vae", config=tracker_config(config))

    # 3. The loop.
    device = accelerator.device
    progress = tqdm(
        total=config.max_train_steps,
        initial=global_step,
        desc="VAE steps",
        disable=not accelerator.is_local_main_process,
    )
    # Preemption (SIGTERM/SIGINT): finish the current step, checkpoint, exit 0.
    with stop_on_signals() as stop_signal:
        model.train()
        while global_step < config.max_train_steps:
            generator = step_generator(config.seed, global_step, accelerator.process_index)
            pixels = load_pixels(stream.indices(global_step, accelerator.process_index), generator).to(device)
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
            adversarial = discriminator is not None and global_step >= config.gan_start_step
            if adversarial:
                with accelerator.autocast():
                    generator_loss = -discriminator(reconstruction).float().mean()  # hinge GAN, generator side
                loss = loss + config.gan_weight * generator_loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            if guard.should_step(grad_norm, global_step):
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
            global_step += 1
            progress.update(1)
            if global_step % config.log_every == 0 or global_step == config.max_train_steps:
                logs = {"rec_loss": rec_loss.item(), "kl": kl_loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
                if adversarial:
                    logs |= {"generator_loss": generator_loss.item(), "discriminator_loss": discriminator_loss.item()}
                progress.set_postfix(rec=f"{logs['rec_loss']:.4f}", kl=f"{logs['kl']:.1f}")
                accelerator.log(logs, step=global_step)
            if stop_signal:
                path = checkpoint_now()
                accelerator.print(
                    f"Received signal {stop_signal[0]} at step {global_step}: saved {path}. Resume with "
                    f"--resume_from_checkpoint latest (same output_dir)."
                )
                accelerator.end_training()
                sys.exit(0)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                checkpoint_now()
    progress.close()

    # 4. Held-out PSNR, data-derived latent scaling, save.
    accelerator.wait_for_everyone()
    vae = accelerator.unwrap_model(model).vae.eval()
    metrics = {}
    if accelerator.is_main_process:
        with torch.no_grad():
            val = validation_pixels.to(device)
            metrics["psnr"] = psnr(vae(val, sample_posterior=False).sample.float(), val).mean().item()
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
        write_manifest(manifest | {"final_metrics": metrics, "skipped_steps": guard.skipped}, output_dir)
        accelerator.log({"psnr": metrics["psnr"]}, step=global_step)
        accelerator.print(
            f"VAE saved to {output_dir}: held-out PSNR {metrics['psnr']:.2f} dB, latent mean "
            f"{metrics['latent_mean']:.4f}, std {metrics['latent_std']:.4f} -> scaling_factor "
            f"{vae.config.scaling_factor:.4f}"
        )
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
