"""Stage 2: train the text-conditioned latent diffusion U-Net with Accelerate.

Usage:
    accelerate launch training/train_ldm.py --config configs/shapes_ldm.yaml [--key value ...]
    latentddpm train-ldm --config configs/shapes_ldm.yaml [--key value ...]

The VAE is frozen and so, by default, is the text encoder; their outputs are precomputed once and cached on disk
(`cache_dir`), so the loop only runs the U-Net. With `train_text_encoder` the text encoder is trained along with the
U-Net and encodes each step's captions (still drawn from the cache, which holds them). Batches and every random draw
are a function of the step (see `latentddpm.batching`), which makes `--resume_from_checkpoint latest` continue at
exactly the next batch.
At the end the whole pipeline (EMA weights when `use_ema`) is saved to `output_dir` with `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from latentddpm.batching import ShuffledStream, seed_global_rng, step_generator
from latentddpm.cache import (
    build_latent_cache,
    cache_key,
    dataset_fingerprint,
    latent_stats,
    load_latent_cache,
    save_latent_cache,
    tensor_fingerprint,
)
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
from latentddpm.latents import vae_scale_factor
from latentddpm.losses import diffusion_loss, min_snr_weights, sample_noise, sample_timesteps
from latentddpm.manifest import build_manifest, write_manifest
from latentddpm.models import ConditionalUNet
from latentddpm.nonfinite import NonFiniteGuard
from latentddpm.optional import import_optional
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.runs import start_run
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder
from latentddpm.validation import run_evaluation, run_validation

logger = get_logger(__name__)
LR_SCHEDULERS = [s.value for s in SchedulerType]


@dataclass
class TrainLDMConfig(DataConfig):
    # --- models ---
    vae: str = "outputs/shapes_vae"  # AutoencoderKL/AutoencoderTiny folder or Hub repo id
    vae_subfolder: str | None = None  # e.g. "vae" for a pipeline repo
    # transformers encoder folder or repo id; None = the pretrained_pipeline's, else all-MiniLM-L6-v2 from pip
    text_encoder: str | None = None
    tokenizer_max_length: int | None = None  # override tokenizer.model_max_length (saved with the pipeline)
    # Fine-tune the text encoder with the U-Net (saved with the pipeline as trained: EMA covers the U-Net only).
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None  # its peak LR (None = learning_rate); low for a pretrained one
    unet_config: str = "configs/unet/small.json"  # ConditionalUNet config for a fresh model
    pretrained_pipeline: str | None = None  # fine-tune the U-Net of this saved pipeline instead
    # --- noise scheduler (DDPMNoiseScheduler config; same names as diffusers' DDPMScheduler) ---
    num_train_timesteps: int = 1000  # diffusion steps T
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"  # the training target
    variance_type: Literal["fixed_small", "learned_range"] = "fixed_small"  # learned_range: L_hybrid (IDDPM)
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023); pair with v_prediction
    # Clip predicted x_0 to [-1, 1] while sampling. Off for latents: they are unit-variance, not bounded, and
    # clipping them erases what the tails encode (on shapes: every red and yellow). Stable Diffusion's is off too.
    clip_sample: bool = False
    # --- objective ---
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); None = plain MSE
    noise_offset: float = 0.0  # offset noise scale (0 = off)
    input_perturbation: float = 0.0  # input perturbation scale (Ning et al. 2023; 0 = off)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (enables CFG)
    vlb_weight: float = 0.001  # lambda of L_hybrid = L_simple + lambda * L_vlb when variance is learned
    # --- optimisation ---
    train_batch_size: int = 64  # per process, per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_train_steps: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    scale_lr: bool = False  # multiply the LR by accumulation * batch * processes
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name (constant, linear, cosine, ...)
    lr_warmup_steps: int = 100  # warmup, in optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0  # gradient clipping (None = off; the norm is still checked for NaN)
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (GPU; must be installed)
    max_consecutive_nonfinite: int = 5  # stop after this many skipped steps in a row with NaN/inf gradients
    # --- EMA ---
    use_ema: bool = True  # keep an EMA of the U-Net; it is what validation and the saved pipeline use
    ema_decay: float = 0.999  # maximum EMA decay
    ema_warmup: bool = True  # EMA warmup (decay grows as 1 - (1 + step)^-2/3)
    ema_power: float = 0.6667  # EMA warmup power
    # --- performance ---
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs
    gradient_checkpointing: bool = False  # trade compute for memory in the U-Net
    enable_xformers: bool = False  # xformers attention (GPU; pip install latentddpm[xformers])
    torch_compile: bool = False  # torch.compile the U-Net
    dataloader_batch_size: int = 64  # batch size for caching latents/text embeddings
    cache_dir: str = "outputs/cache"  # where latents and text embeddings are cached (keyed by content hash)
    torch_threads: int | None = None  # torch.set_num_threads on CPU (None = torch default)
    # --- checkpoints, logging, validation ---
    output_dir: str = "outputs/shapes_ldm"  # the saved pipeline goes here, checkpoints in output_dir/checkpoints
    seed: int = 0  # seeds model init, data order and every random draw
    checkpointing_steps: int = 500  # save a checkpoint every N optimizer steps (0 = never)
    checkpoints_total_limit: int | None = 3  # keep at most N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    log_every: int = 10  # log loss and LR every N steps
    validation_steps: int = 500  # sample the validation prompts every N steps (0 = only at the end)
    validation_prompts: list[str] = field(default_factory=list)  # prompts for the validation grid
    validation_inference_steps: int = 25  # sampling steps for validation images
    validation_guidance_scale: float = 3.0  # CFG scale for validation images
    num_validation_samples: int = 0  # rows held out of training for the validation loss
    validation_shapes_score: bool = False  # score all 90 shapes prompts with the pixel judge at validation
    evaluation_config: str | None = None  # YAML of `latentddpm evaluate` keys: run it at evaluation_steps and the end
    evaluation_steps: int = 0  # run the evaluation (and the validation with it) every N steps (0 = only at the end)
    push_to_hub: bool = False  # upload the final pipeline with a model card
    hub_model_id: str | None = None  # repo id for push_to_hub

    def validate(self) -> None:
        super().validate()
        check_ranges(
            self,
            positive=(
                "tokenizer_max_length",
                "num_train_timesteps",
                "snr_gamma",
                "train_batch_size",
                "gradient_accumulation_steps",
                "max_train_steps",
                "learning_rate",
                "text_encoder_learning_rate",
                "adam_epsilon",
                "max_grad_norm",
                "max_consecutive_nonfinite",
                "ema_power",
                "dataloader_batch_size",
                "torch_threads",
                "checkpoints_total_limit",
                "log_every",
                "validation_inference_steps",
            ),
            non_negative=(
                "noise_offset",
                "input_perturbation",
                "vlb_weight",
                "lr_warmup_steps",
                "adam_weight_decay",
                "checkpointing_steps",
                "validation_steps",
                "evaluation_steps",
                "num_validation_samples",
            ),
            unit_interval=("caption_dropout", "adam_beta1", "adam_beta2"),
        )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"Config key 'lr_scheduler' must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"Config key 'ema_decay' must be in (0, 1), got {self.ema_decay}.")
        if self.evaluation_config is not None and not Path(self.evaluation_config).is_file():
            raise ConfigError(f"Config key 'evaluation_config': no such file {self.evaluation_config!r}.")
        if self.evaluation_steps and self.evaluation_config is None:
            raise ConfigError("Config key 'evaluation_steps' needs 'evaluation_config' (what to evaluate).")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("Config key 'hub_model_id' is required when push_to_hub is true.")


def load_vae(config: TrainLDMConfig):
    """The frozen VAE: AutoencoderKL, or AutoencoderTiny when the folder's config says so."""
    vae_config = AutoencoderKL.load_config(config.vae, subfolder=config.vae_subfolder)
    vae_cls = AutoencoderTiny if vae_config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    return vae_cls.from_pretrained(config.vae, subfolder=config.vae_subfolder)


def build_unet(config: TrainLDMConfig, vae, text_encoder) -> ConditionalUNet:
    """A fresh U-Net from `unet_config`, sized for this VAE's latents and this text encoder's width."""
    if config.pretrained_pipeline:
        return ConditionalUNet.from_pretrained(config.pretrained_pipeline, subfolder="unet")
    in_channels = vae.config.latent_channels
    return ConditionalUNet.from_config(
        ConditionalUNet.load_config(config.unet_config),
        sample_size=config.resolution // vae_scale_factor(vae),
        in_channels=in_channels,
        # The scheduler's learned variance needs a second set of channels (Nichol & Dhariwal 2021).
        out_channels=in_channels * (2 if config.variance_type == "learned_range" else 1),
        cross_attention_dim=text_encoder.config.hidden_size,
    )


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TrainLDMConfig, argv)
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    # Before any model or data is loaded, so that a wrong path fails in seconds.
    checkpoint = resolve_checkpoint(checkpoint_dir, config.resume_from_checkpoint)
    accelerator = start_run(config)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # 1. Frozen VAE, text encoder (frozen unless train_text_encoder), our noise scheduler, our U-Net.
    vae = load_vae(config).eval().requires_grad_(False)
    if config.text_encoder is None and config.pretrained_pipeline:
        tokenizer, text_encoder = load_text_encoder(config.pretrained_pipeline, from_pipeline=True)
    else:
        tokenizer, text_encoder = load_text_encoder(config.text_encoder or default_text_encoder_path())
    if config.tokenizer_max_length is not None:
        tokenizer.model_max_length = config.tokenizer_max_length
    text_encoder.eval().requires_grad_(config.train_text_encoder)
    if getattr(text_encoder, "pooler", None) is not None:
        # BERT's pooler is not on the path to `last_hidden_state`: trained, it would get no gradient (and DDP fail).
        text_encoder.pooler.requires_grad_(False)
    noise_scheduler = DDPMNoiseScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        clip_sample=config.clip_sample,
    )
    unet = build_unet(config, vae, text_encoder)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers:
        import_optional("xformers", extra="xformers", feature="enable_xformers")
        unet.enable_xformers_memory_efficient_attention()
    logger.info(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")

    # 2. Data -> cached latents and text embeddings (built once by the main process, keyed by content).
    dataset = config.load_dataset(config.seed)
    transform = ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=False)
    fingerprint = dataset_fingerprint(dataset)
    key = cache_key(
        dataset=fingerprint,
        columns=[config.image_column, config.caption_column],
        vae=tensor_fingerprint(vae),
        text_encoder=tensor_fingerprint(text_encoder),
        max_length=tokenizer.model_max_length,
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        min_image_size=config.min_image_size,
    )
    cache_folder = Path(config.cache_dir) / key
    with accelerator.main_process_first():
        cache = load_latent_cache(cache_folder)
        if cache is None and accelerator.is_main_process:
            dataset, report = prepare_image_dataset(dataset, config.image_column, min_size=config.min_image_size)
            logger.info(f"Data: {report}")
            cache = build_latent_cache(
                dataset,
                image_column=config.image_column,
                caption_column=config.caption_column,
                transform=transform,
                vae=vae.to(accelerator.device),
                tokenizer=tokenizer,
                text_encoder=text_encoder.to(accelerator.device),
                random_flip=config.random_flip,
                batch_size=config.dataloader_batch_size,
                device=accelerator.device,
                seed=config.seed,
            )
            save_latent_cache(cache, cache_folder)
        else:
            logger.info(f"Reusing cached latents and text embeddings from {cache_folder}")
    if cache is None:  # non-main processes: the main process has written it by now
        cache = load_latent_cache(cache_folder)
    # Only validation sampling uses them from here on.
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    logger.info(f"Cache: {len(cache)} images, latent stats {latent_stats(cache, vae)}")

    num_rows = len(cache) - config.num_validation_samples
    if num_rows <= 0:
        raise ConfigError(f"num_validation_samples={config.num_validation_samples} leaves no training rows.")
    validation_rows = torch.arange(num_rows, len(cache))
    stream = ShuffledStream(num_rows, config.train_batch_size, accelerator.num_processes, seed=config.seed)

    # 3. Optimizer, LR schedule, EMA.
    lr_scale = 1.0
    if config.scale_lr:
        lr_scale = config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    param_groups = [{"params": list(unet.parameters()), "lr": config.learning_rate * lr_scale}]
    if config.train_text_encoder:
        text_encoder_lr = config.text_encoder_learning_rate or config.learning_rate
        trainable = [p for p in text_encoder.parameters() if p.requires_grad]
        param_groups.append({"params": trainable, "lr": text_encoder_lr * lr_scale})
    if config.use_8bit_adam:
        bnb = import_optional("bitsandbytes", extra="bitsandbytes", feature="use_8bit_adam")
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(
        param_groups,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    if config.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        trained_models = (unet, text_encoder)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained_models = (unet,)
    trained_params = [p for group in param_groups for p in group["params"]]
    if config.torch_compile:
        unet = torch.compile(unet)
    ema = None
    if config.use_ema:
        ema = EMAModel(
            accelerator.unwrap_model(unet).parameters(),
            decay=config.ema_decay,
            use_ema_warmup=config.ema_warmup,
            power=config.ema_power,
            model_cls=ConditionalUNet,
            model_config=accelerator.unwrap_model(unet).config,
        )
        ema.to(accelerator.device)

    # 4. Resume: model/optimizer/LR/RNG from accelerate, EMA from its safetensors, the step from our state.
    global_step, skipped_steps, train_seconds = 0, 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        global_step, skipped_steps = state["global_step"], state["skipped_steps"]
        train_seconds = state.get("train_seconds", 0.0)
        if ema is not None:
            ema.load_state_dict(
                EMAModel.from_pretrained(str(checkpoint / "unet_ema"), model_cls=ConditionalUNet).state_dict()
            )
            ema.to(accelerator.device)
        logger.info(f"Resumed from {checkpoint} at step {global_step}")
    elif config.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {checkpoint_dir} yet: starting from scratch")

    guard = NonFiniteGuard(config.max_consecutive_nonfinite, checkpoint_dir, skipped=skipped_steps)

    manifest = build_manifest(config_to_dict(config), config.seed, fingerprint, cache_key=key)

    def write_extra(folder: Path) -> None:
        if ema is not None:
            ema.save_pretrained(str(folder / "unet_ema"))
        save_config(config, folder / "train_config.yaml")
        write_manifest(manifest, folder)

    def checkpoint_now() -> Path:
        return save_checkpoint(
            accelerator,
            checkpoint_dir,
            global_step,
            {"global_step": global_step, "skipped_steps": guard.skipped, "train_seconds": train_seconds},
            write_extra=write_extra,
            total_limit=config.checkpoints_total_limit,
        )

    def make_pipeline() -> LatentDDPMPipeline:
        return LatentDDPMPipeline(
            vae=vae,
            text_encoder=accelerator.unwrap_model(text_encoder),
            tokenizer=tokenizer,
            unet=accelerator.unwrap_model(unet),
            # A copy: sampling sets timesteps on its scheduler, training's stays untouched.
            scheduler=DDPMNoiseScheduler.from_config(noise_scheduler.config),
        )

    def text_conditioning(caption_ids: torch.Tensor, encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(hidden (B, S, D), mask (B, S))` of caption rows: cached, or encoded by the text encoder being trained
        (`encoder`: the wrapped model by default; the unwrapped one outside the training step, on one process)."""
        if not config.train_text_encoder:
            return cache.text(caption_ids)
        prompts = [cache.prompt(i) for i in caption_ids.tolist()]
        return encode_prompt(prompts, tokenizer, encoder or text_encoder, device=accelerator.device)

    def validate(ema_model: EMAModel | None, evaluation: bool) -> dict:
        """Validation (and evaluation) metrics at `global_step`; the models are set back to train mode after."""
        for model in trained_models:
            model.eval()
        accelerator.log({"train_minutes": train_seconds / 60}, step=global_step)
        metrics = run_validation(
            config,
            accelerator,
            unet,
            ema_model,
            make_pipeline,
            noise_scheduler,
            cache,
            validation_rows,
            vae,
            global_step,
            # Unwrapped: a DDP forward would wait for the other processes, which do not validate.
            text=partial(text_conditioning, encoder=accelerator.unwrap_model(text_encoder)),
        )
        if evaluation:
            metrics |= run_evaluation(
                config.evaluation_config, accelerator, unet, ema_model, make_pipeline, config.output_dir, global_step
            )
        for model in trained_models:
            model.train()
        return metrics

    if accelerator.is_main_process:
        accelerator.init_trackers("latentddpm", config=tracker_config(config))

    # 5. The loop. One optimizer step = gradient_accumulation_steps micro-batches per process.
    accum = config.gradient_accumulation_steps
    device = accelerator.device
    progress = tqdm(
        total=config.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    # Preemption (SIGTERM/SIGINT): finish the current step, checkpoint, exit 0.
    with stop_on_signals() as stop_signal:
        for model in trained_models:
            model.train()
        while global_step < config.max_train_steps:
            step_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                micro_step = global_step * accum + micro
                generator = step_generator(config.seed, micro_step, accelerator.process_index)
                seed_global_rng(config.seed, micro_step, accelerator.process_index)
                rows = stream.indices(micro_step, accelerator.process_index)
                latents, caption_ids = cache.draw(rows, vae, generator, caption_dropout=config.caption_dropout)
                noise = sample_noise(latents, generator, config.noise_offset)
                perturbation = torch.randn(latents.shape, generator=generator) if config.input_perturbation else None
                timesteps = sample_timesteps(latents.shape[0], config.num_train_timesteps, generator)
                latents, noise, timesteps = (t.to(device) for t in (latents, noise, timesteps))
                if perturbation is not None:
                    perturbation = perturbation.to(device)

                with contextlib.ExitStack() as context:
                    if micro < accum - 1:  # gradients are all-reduced only on the last micro-batch
                        for model in trained_models:
                            context.enter_context(accelerator.no_sync(model))
                    context.enter_context(accelerator.autocast())
                    hidden, mask = (t.to(device) for t in text_conditioning(caption_ids))
                    mse, vlb = diffusion_loss(
                        unet,
                        noise_scheduler,
                        latents,
                        noise,
                        timesteps,
                        hidden,
                        mask,
                        input_perturbation=config.input_perturbation,
                        perturbation_noise=perturbation,
                    )
                    loss = (mse * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)).mean()
                    if vlb is not None:
                        loss = loss + config.vlb_weight * vlb.mean()
                    accelerator.backward(loss / accum)
                loss_sum += loss.detach() / accum

            # Non-finite gradients (same on every process after the all-reduce): skip the update, count it.
            grad_norm = accelerator.clip_grad_norm_(
                trained_params, config.max_grad_norm if config.max_grad_norm is not None else math.inf
            )
            stepped = guard.should_step(grad_norm, global_step)
            if stepped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            if ema is not None and stepped:
                ema.step(accelerator.unwrap_model(unet).parameters())
            global_step += 1
            progress.update(1)
            train_seconds += time.perf_counter() - step_start

            if global_step % config.log_every == 0 or global_step == config.max_train_steps:
                loss_value = accelerator.reduce(loss_sum, reduction="mean").item()
                logs = {
                    "loss": loss_value,
                    "lr": lr_scheduler.get_last_lr()[0],
                    **({"lr_text_encoder": lr_scheduler.get_last_lr()[1]} if config.train_text_encoder else {}),
                    "grad_norm": grad_norm.item(),
                    "train_minutes": train_seconds / 60,
                }
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
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
            if global_step < config.max_train_steps:
                # (TrainLDMConfig.validate requires evaluation_config wherever evaluation_steps is set)
                evaluation = bool(config.evaluation_steps) and global_step % config.evaluation_steps == 0
                if evaluation or (config.validation_steps and global_step % config.validation_steps == 0):
                    validate(ema, evaluation)
    progress.close()

    # 6. Save the pipeline with EMA weights, its config and manifest, and a sample grid.
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(unet).parameters())
    metrics = validate(None, evaluation=config.evaluation_config is not None)
    if accelerator.is_main_process:
        pipeline = make_pipeline()
        pipeline.save_pretrained(str(output_dir))
        save_config(config, output_dir / "train_config.yaml")
        final_metrics = {k: v for k, v in metrics.items() if k != "grid"}  # the grid is saved as a PNG
        write_manifest(manifest | {"final_metrics": final_metrics, "skipped_steps": guard.skipped}, output_dir)
        if config.push_to_hub:
            pipeline.push_to_hub(config.hub_model_id, dataset=config.dataset, sample_grid=metrics.get("grid"))
        logger.info(f"Saved the pipeline to {output_dir}")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
