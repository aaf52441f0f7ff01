"""Stage 2: train the text-conditioned latent diffusion U-Net with Accelerate.

Usage:
    accelerate launch training/train_ldm.py --config configs/shapes_ldm.yaml [--key value ...]
    latentddpm train-ldm --config configs/shapes_ldm.yaml [--key value ...]

The VAE is frozen and so, by default, is the text encoder; their outputs are precomputed once and cached on disk
(`cache_dir`), so the loop only runs the U-Net. With `train_text_encoder` the text encoder is trained along with the
U-Net and encodes each step's captions (still drawn from the cache, which holds them). Batches and every random draw
are a function of the step (see `latentddpm.batching`), which makes `--resume_from_checkpoint latest` continue at
exactly the next batch. The loss of a step is the mean of `latentddpm.losses.training_losses` (`training_loss`, which
validation and the training benchmark call too).
DreamBooth (`instance_data`, see `latentddpm.dreambooth`) trains on a folder of a few images instead of `dataset`;
with prior preservation each micro-batch also holds as many class images, generated once by the pretrained pipeline,
and the loss is the instance rows' mean + `prior_loss_weight` * the class rows' mean.
At the end the whole pipeline (EMA weights when `use_ema`) is saved to `output_dir` with `save_pretrained`, with a
model card (`README.md`: the recipe, the validation grid, the evaluation's metrics). `push_to_hub` commits it to
`hub_model_id`, and with `hub_strategy` every checkpoint too, in the background (see `latentddpm.hub`).

With `lora_rank` > 0 only LoRA adapters train, on the U-Net (and with `text_encoder_lora_rank` the text encoder) of
`pretrained_pipeline`; checkpoints hold the adapters and their optimizer state, and the run ends with the adapters
alone, `output_dir/pytorch_lora_weights.safetensors` (diffusers' LoRA format), and the validation grid:
    accelerate launch training/train_ldm.py --config configs/shapes_ldm.yaml --pretrained_pipeline outputs/shapes_ldm \
        --lora_rank 4 --learning_rate 1e-4 --output_dir outputs/shapes_lora
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from latentddpm.batching import (
    BucketedStream,
    MicroBatches,
    PairedStream,
    ShuffledStream,
    seed_global_rng,
    step_generator,
)
from latentddpm.buckets import aspect_ratio_buckets, bucket_multiple, bucket_name
from latentddpm.cache import (
    LatentCache,
    build_latent_cache,
    cache_is_complete,
    cache_key,
    dataset_fingerprint,
    finish_latent_cache,
    latent_stats,
    tensor_fingerprint,
)
from latentddpm.config import (
    ConfigError,
    DataConfig,
    config_file,
    config_to_dict,
    fraction,
    non_negative,
    parse_config,
    positive,
    save_config,
    tracker_config,
)
from latentddpm.data.transforms import ImageTransform
from latentddpm.dreambooth import (
    ClassImageSettings,
    generate_class_images,
    prior_preservation_loss,
    read_image_folder,
    read_prompts,
    rows_fingerprint,
)
from latentddpm.ema import ShardedEMAModel
from latentddpm.hub import STAGING, HubStrategy, HubUploader, hardware_description
from latentddpm.latents import encode_posterior, scale_latents, vae_scale_factor
from latentddpm.lora import (
    UNET_LORA_TARGETS,
    add_text_encoder_lora,
    add_unet_lora,
    load_lora,
    lora_config,
    save_lora,
    text_encoder_lora_targets,
)
from latentddpm.losses import Objective, training_losses
from latentddpm.manifest import build_manifest, write_manifest
from latentddpm.models import ConditionalUNet
from latentddpm.optional import import_optional
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.pipelines.model_card import (
    TrainingRecipe,
    training_sections,
    write_lora_model_card,
    write_training_model_card,
)
from latentddpm.runs import LR_SCHEDULERS, RunState, TrainingRun, find_checkpoint, start_run
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.streaming import StreamingBatches, StreamingState, streaming_loader
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder
from latentddpm.validation import ema_weights, evaluation_dir, run_evaluation, run_validation

logger = get_logger(__name__)
# The noise scheduler of a fresh model, under the `noise_scheduler` keys. Cosine betas (Nichol & Dhariwal 2021) and
# v-prediction (Salimans & Ho 2022). `clip_sample` off: latents are unit-variance, not bounded, and clipping x_0 to
# [-1, 1] erases what the tails encode (on shapes: every red and yellow); Stable Diffusion's is off too.
NEW_MODEL_NOISE_SCHEDULER = {
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}
SIZE_CONDITIONING_DIM = 256  # each size and crop number's sinusoidal embedding, as SDXL's
NOISE_SCHEDULER_KEYS = sorted(set(inspect.signature(DDPMNoiseScheduler.__init__).parameters) - {"self"})


@dataclass
class TrainLDMConfig(DataConfig):
    # --- models ---
    # AutoencoderKL/AutoencoderTiny folder or Hub repo id; None = the pretrained pipeline's (required without one)
    vae: str | None = None
    vae_subfolder: str | None = None  # e.g. "vae" for a pipeline repo
    # transformers encoder folder or repo id; None = the pretrained_pipeline's, else all-MiniLM-L6-v2 from pip
    text_encoder: str | None = None
    tokenizer_max_length: int | None = positive(None)  # override tokenizer.model_max_length (saved with the pipeline)
    # Cross-attention ignores the prompt's padding (True), or attends to the whole padded prompt with no mask, as
    # Stable Diffusion does (False: the model then exports to Stable Diffusion with identical images). None = the
    # pretrained pipeline's setting, else True. Saved in the pipeline's config (`use_attention_mask`).
    use_attention_mask: bool | None = None
    # Fine-tune the text encoder with the U-Net (saved with the pipeline as trained: EMA covers the U-Net only).
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = positive(None)  # its peak LR (None = learning_rate); low if pretrained
    unet_config: str = config_file("configs/unet/small.json")  # ConditionalUNet config for a fresh model
    # Fine-tune this pipeline (its U-Net, VAE, text encoder, tokenizer and noise process): ours, a Stable Diffusion
    # diffusers folder or Hub id, or a single-file checkpoint (with `single_file_config`).
    pretrained_pipeline: str | None = None
    single_file_config: str | None = None  # for a single-file pretrained_pipeline: a diffusers SD folder or Hub id
    # --- LoRA ---
    # Train LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the frozen U-Net instead of all its
    # weights: their rank (0 = full fine-tune). The run then saves the adapters alone, in diffusers' LoRA format:
    # output_dir/pytorch_lora_weights.safetensors, for `load_lora_weights` (ours, or Stable Diffusion's on an SD base).
    lora_rank: int = non_negative(0)
    lora_alpha: float | None = positive(None)  # the update is lora_alpha / lora_rank * B A (None = lora_rank)
    lora_dropout: float = fraction(0.0)  # dropout on the adapters' input
    lora_target_modules: list[str] = field(default_factory=UNET_LORA_TARGETS.copy)  # U-Net modules that get adapters
    # Adapters of this rank on the text encoder's attention too (0 = none; needs lora_rank). Its captions are then
    # encoded every step, as with train_text_encoder.
    text_encoder_lora_rank: int = non_negative(0)
    # --- noise scheduler ---
    # DDPMNoiseScheduler keys (the names of diffusers' DDPMScheduler: prediction_type, beta_schedule, variance_type,
    # ...) over the base: the pretrained pipeline's scheduler config, or NEW_MODEL_NOISE_SCHEDULER for a fresh model.
    # `variance_type: learned_range` trains the variance too (Improved DDPM's L_hybrid).
    noise_scheduler: dict[str, Any] = field(default_factory=dict)
    # --- objective (latentddpm.losses.Objective) ---
    snr_gamma: float | None = positive(5.0)  # min-SNR-gamma loss weighting (Hang et al. 2023); None = plain MSE
    noise_offset: float = non_negative(0.0)  # offset noise scale (0 = off)
    input_perturbation: float = non_negative(0.0)  # input perturbation scale (Ning et al. 2023; 0 = off)
    caption_dropout: float = fraction(0.1)  # probability of training on the empty prompt (enables CFG)
    vlb_weight: float = non_negative(0.001)  # lambda of L_hybrid = L_simple + lambda * L_vlb when variance is learned
    # --- DreamBooth (latentddpm.dreambooth; Ruiz et al. 2023) ---
    # A folder of a few images of one subject, trained on instead of `dataset`. An image's caption is the text of the
    # .txt file of the same name beside it (kohya's and diffusers' convention), else `instance_prompt`.
    instance_data: str | None = None
    instance_prompt: str | None = None  # the caption of instance images without a .txt file, e.g. "a sks star"
    # The subject's class, for prior preservation: a prompt, a YAML list of prompts (class image i gets prompt i mod
    # their number) or a .txt file of one prompt per line (the way to give several on the command line).
    class_prompt: str | list[str] | None = None
    # Also train, in the same step, on class images the pretrained pipeline generated before fine-tuning
    with_prior_preservation: bool = False
    prior_loss_weight: float = non_negative(1.0)  # loss = instance loss + prior_loss_weight * class loss
    num_class_images: int = positive(100)  # class images generated (once, kept on disk) and trained on
    # Where class images are kept (00000.png + 00000.txt, ...; a killed generation resumes), None = a folder of
    # cache_dir/class_images named by the hash of the pipeline and the settings below
    class_data_dir: str | None = None
    sample_batch_size: int = positive(4)  # class images per pipeline call
    class_inference_steps: int = positive(25)  # sampling steps of a class image
    class_guidance_scale: float = 3.0  # CFG scale of the class images
    # Images with an alpha channel train where they are opaque only (their alpha, averaged over each latent pixel's
    # patch, weights the loss); opaque images train everywhere. Any dataset, not only instance_data.
    masked_loss: bool = False
    # --- optimisation ---
    train_batch_size: int = positive(64)  # per process, per micro-batch
    # micro-batches per optimizer step; None = accelerate's (a DeepSpeed config's, `accelerate launch
    # --gradient_accumulation_steps`, else 1)
    gradient_accumulation_steps: int | None = positive(None)
    max_train_steps: int = positive(2000)  # optimizer steps
    learning_rate: float = positive(1e-3)  # peak learning rate
    scale_lr: bool = False  # multiply the LR by accumulation * batch * processes
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name (constant, linear, cosine, ...)
    lr_warmup_steps: int = non_negative(100)  # warmup, in optimizer steps
    adam_beta1: float = fraction(0.9)
    adam_beta2: float = fraction(0.999)
    adam_weight_decay: float = non_negative(0.0)
    adam_epsilon: float = positive(1e-8)
    max_grad_norm: float | None = positive(1.0)  # gradient clipping (None = off; the norm is still checked for NaN)
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (GPU; must be installed)
    max_consecutive_nonfinite: int = positive(5)  # stop after this many skipped steps in a row with NaN/inf gradients
    # --- EMA ---
    use_ema: bool = True  # keep an EMA of the U-Net; it is what validation and the saved pipeline use
    ema_decay: float = 0.999  # maximum EMA decay, in (0, 1)
    ema_warmup: bool = True  # EMA warmup (decay grows as 1 - (1 + step)^-2/3)
    ema_power: float = positive(0.6667)  # EMA warmup power
    # Where the EMA lives: with the weights ("accelerator") or in CPU memory ("cpu": frees accelerator memory, costs a
    # copy of the weights to the host at each update). Under FSDP and ZeRO-3 each process keeps its shards' EMA.
    ema_device: Literal["accelerator", "cpu"] = "accelerator"
    ema_update_every: int = positive(1)  # update the EMA every N optimizer steps (with the decay of N steps)
    # --- performance ---
    # autocast precision; None = accelerate's (`accelerate launch --mixed_precision`, `accelerate config`, else "no")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs
    gradient_checkpointing: bool = False  # trade compute for memory in the U-Net
    enable_xformers: bool = False  # xformers attention (GPU; pip install latentddpm[xformers])
    # torch.compile the trained models (accelerate's dynamo backend "inductor", or "no"); None = accelerate's
    # (`accelerate launch --dynamo_backend`, `accelerate config`, else no compilation)
    torch_compile: bool | None = None
    dataloader_batch_size: int = positive(64)  # batch size for caching latents/text embeddings
    cache_dir: str = "outputs/cache"  # where latents and text embeddings are cached (keyed by content hash)
    cache_shard_size: int = positive(4096)  # images per cache shard (and captions per text shard)
    # Precision of the cached latent moments and text embeddings (float16 halves the disk and page cache of float32;
    # what it changes on the demo: BENCHMARKS.md, data_scale)
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # Cache the text embeddings of every unique caption (True), or encode each batch's captions with the frozen text
    # encoder as the step runs (False: no text shards; BENCHMARKS.md, data_scale, says when that is faster)
    cache_text_embeddings: bool = True
    # DataLoader workers reading micro-batches ahead of the step (0: the training process reads them itself); a
    # streaming run resumes with the same number
    dataloader_num_workers: int = non_negative(1)
    # --- data at scale ---
    # Aspect-ratio buckets: each image is resized and cropped to the bucket nearest its aspect ratio, of about
    # resolution**2 pixels with sides in multiples the VAE and U-Net accept, and every batch is from one bucket
    # (latentddpm.buckets); the bucket histogram is logged. Off: the square `resolution` crop.
    aspect_ratio_buckets: bool = False
    max_aspect_ratio: float = positive(2.0)  # the most elongated bucket (long side / short side)
    # SDXL's micro-conditioning (Podell et al. 2023) on each image's original size and crop, through the U-Net's added
    # time embedding (a fresh U-Net gets `addition_time_embed_dim`), so crops do not leak into samples; the pipeline
    # then samples "uncropped" at the size asked for.
    size_conditioning: bool = False
    # Stream the dataset (`datasets` streaming: the Hub, parquet, webdataset tar shards) and encode each batch as the
    # step runs, with no cache: data larger than the disk. Resumes exactly (each process's stream position is in the
    # checkpoints; latentddpm.streaming).
    streaming: bool = False
    shuffle_buffer: int = positive(1000)  # streaming: rows shuffled together (after the shard order)
    torch_threads: int | None = positive(None)  # torch.set_num_threads on CPU (None = torch default)
    # With torch_threads None, on CPU: fewer threads than cores when other processes keep cores busy (measured at
    # start, logged; latentddpm.threads). Off by default: results then depend on the machine's load, bit for bit.
    adapt_torch_threads: bool = False
    # --- checkpoints, logging, validation ---
    output_dir: str = "outputs/shapes_ldm"  # the saved pipeline goes here, checkpoints in output_dir/checkpoints
    seed: int = 0  # seeds model init, data order and every random draw
    checkpointing_steps: int = non_negative(500)  # save a checkpoint every N optimizer steps (0 = never)
    checkpoints_total_limit: int | None = positive(3)  # keep at most N checkpoints
    # "latest", a checkpoint folder, or a Hub repo id: its last-checkpoint/ (hub_strategy: checkpoint) is downloaded
    resume_from_checkpoint: str | None = None
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    log_every: int = positive(10)  # log loss and LR every N steps
    validation_steps: int = non_negative(500)  # sample the validation prompts every N steps (0 = only at the end)
    validation_prompts: list[str] = field(default_factory=list)  # prompts for the validation grid
    validation_inference_steps: int = positive(25)  # sampling steps for validation images
    validation_guidance_scale: float = 3.0  # CFG scale for validation images
    num_validation_samples: int = non_negative(0)  # rows held out of training for the validation loss
    validation_shapes_score: bool = False  # score all 90 shapes prompts with the pixel judge at validation
    evaluation_config: str | None = None  # YAML of `latentddpm evaluate` keys: run it at evaluation_steps and the end
    evaluation_steps: int = non_negative(0)  # evaluate (and validate) every N steps (0 = only at the end)
    push_to_hub: bool = False  # upload the final pipeline with a model card
    hub_model_id: str | None = None  # repo id for push_to_hub
    # What push_to_hub commits while training (transformers' Trainer names): "end" only the final pipeline;
    # "every_save" each checkpoint's pipeline too, in the background; "checkpoint" also the checkpoint itself, as
    # last-checkpoint/ (for --resume_from_checkpoint <hub_model_id> on another machine).
    hub_strategy: HubStrategy = "end"
    hub_private_repo: bool | None = None  # whether a newly created repo is private (None: the Hub's default)
    hub_license: str = "apache-2.0"  # the model card's license (a fine-tuned model's is often its base model's)

    def validate(self) -> None:
        if self.vae is None and self.pretrained_pipeline is None:
            raise ConfigError(
                "Config key 'vae' is required (a trained VAE) unless 'pretrained_pipeline' provides one."
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"Config key 'lr_scheduler' must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"Config key 'ema_decay' must be in (0, 1), got {self.ema_decay}.")
        unknown = sorted(set(self.noise_scheduler) - set(NOISE_SCHEDULER_KEYS))
        if unknown:
            valid = ", ".join(NOISE_SCHEDULER_KEYS)
            raise ConfigError(f"Config key 'noise_scheduler' has unknown keys {unknown}; valid keys: {valid}.")
        try:
            DDPMNoiseScheduler(**(NEW_MODEL_NOISE_SCHEDULER | self.noise_scheduler))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"Config key 'noise_scheduler': {error}") from error
        if self.evaluation_config is not None and not Path(self.evaluation_config).is_file():
            raise ConfigError(f"Config key 'evaluation_config': no such file {self.evaluation_config!r}.")
        if self.evaluation_steps and self.evaluation_config is None:
            raise ConfigError("Config key 'evaluation_steps' needs 'evaluation_config' (what to evaluate).")
        if self.text_encoder_lora_rank and not self.lora_rank:
            raise ConfigError("Config key 'text_encoder_lora_rank' needs 'lora_rank' (adapters on the U-Net too).")
        if self.lora_rank and self.train_text_encoder:
            raise ConfigError(
                "Config key 'train_text_encoder' fine-tunes the whole text encoder, which a LoRA run (lora_rank) "
                "keeps frozen: use 'text_encoder_lora_rank' for adapters on it."
            )
        if self.lora_rank and not self.lora_target_modules:
            raise ConfigError("Config key 'lora_target_modules' must name at least one U-Net module for LoRA.")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("Config key 'hub_model_id' is required when push_to_hub is true.")
        if self.hub_strategy != "end" and not (self.push_to_hub and self.checkpointing_steps):
            raise ConfigError(
                f"Config key 'hub_strategy' {self.hub_strategy!r} commits checkpoints: it needs push_to_hub and "
                "checkpointing_steps > 0."
            )
        self.validate_dreambooth()
        self.validate_data_at_scale()

    def validate_data_at_scale(self) -> None:
        features = [key for key in ("aspect_ratio_buckets", "size_conditioning", "masked_loss") if getattr(self, key)]
        if self.streaming and (features or self.instance_data or self.num_validation_samples):
            unsupported = features + ["instance_data"] * bool(self.instance_data)
            unsupported += ["num_validation_samples"] * bool(self.num_validation_samples)
            raise ConfigError(f"Config key 'streaming' does not work with {unsupported} (they need the latent cache).")
        if self.aspect_ratio_buckets and self.instance_data:
            raise ConfigError("Config key 'aspect_ratio_buckets' does not work with DreamBooth's 'instance_data'.")
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"Config key 'max_aspect_ratio' must be >= 1, got {self.max_aspect_ratio}.")

    def validate_dreambooth(self) -> None:
        if self.instance_data is None:
            if self.with_prior_preservation:
                raise ConfigError("Config key 'with_prior_preservation' needs 'instance_data' (the subject's images).")
            return
        if not Path(self.instance_data).is_dir():
            raise ConfigError(f"Config key 'instance_data': no such folder {self.instance_data!r}.")
        if self.num_validation_samples:
            raise ConfigError(
                "Config key 'num_validation_samples' holds out rows of 'dataset', which DreamBooth ('instance_data') "
                "does not read: set it to 0."
            )
        if self.with_prior_preservation and self.class_prompt is None:
            raise ConfigError("Config key 'with_prior_preservation' needs 'class_prompt' (what class images show).")
        if self.with_prior_preservation and self.pretrained_pipeline is None:
            raise ConfigError(
                "Config key 'with_prior_preservation' needs 'pretrained_pipeline' (the base that draws class images)."
            )

    def objective(self) -> Objective:
        return Objective(self.snr_gamma, self.noise_offset, self.input_perturbation, self.vlb_weight)

    @property
    def text_encoder_trains(self) -> bool:
        """Whether the text encoder (all of it, or its LoRA adapters) trains: it then encodes each step's captions."""
        return self.train_text_encoder or self.text_encoder_lora_rank > 0

    def dynamo_backend(self) -> str | None:
        """accelerate's dynamo backend for `torch_compile`: None leaves it to accelerate's config and launcher."""
        if self.torch_compile is None:
            return None
        return "inductor" if self.torch_compile else "no"


@dataclass
class Models:
    """The pipeline's parts, unwrapped (accelerate's wrappers live in `Optimisation`)."""

    vae: AutoencoderKL | AutoencoderTiny  # frozen
    tokenizer: Any
    text_encoder: torch.nn.Module  # frozen unless `train_text_encoder`
    noise_scheduler: DDPMNoiseScheduler  # training's own: sampling uses copies
    unet: ConditionalUNet
    use_attention_mask: bool  # whether cross-attention ignores the prompts' padding

    def pipeline(self) -> LatentDDPMPipeline:
        return LatentDDPMPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            # A copy: sampling sets timesteps on its scheduler, training's stays untouched.
            scheduler=DDPMNoiseScheduler.from_config(self.noise_scheduler.config),
            use_attention_mask=self.use_attention_mask,
        )


@dataclass
class Data:
    """The cached data (latent cache and the stream of its rows), or with `streaming` the streamed dataset."""

    cache: LatentCache | None  # latents (posterior moments) and text embeddings of every row
    stream: ShuffledStream | PairedStream | BucketedStream | None  # the training rows of each micro-step and process
    validation_rows: torch.Tensor  # rows held out for the validation loss
    manifest: dict  # what produced this run (config, data fingerprint, cache key, versions)
    # With prior preservation, how many rows of each micro-batch are instance rows (the rest are class rows)
    num_instance_rows: int | None = None
    streamed: IterableDataset | None = None  # with `streaming`: the dataset, images not decoded
    stream_state: StreamingState | None = None  # with `streaming`: where this process's stream stands (checkpointed)

    @property
    def num_rows(self) -> int | None:
        """The rows trained on (None when streaming: unknown until read)."""
        return None if self.stream is None else self.stream.num_rows


@dataclass
class Optimisation:
    unet: torch.nn.Module  # as prepared by accelerate (DDP, compiled, ...)
    text_encoder: torch.nn.Module | None  # prepared, when trained
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: ShardedEMAModel | None  # of the U-Net's weights as each process holds them (sharded under FSDP, ZeRO-3)
    params: list[torch.nn.Parameter]  # what the optimizer updates, as prepared (gradient clipping)
    unet_params: list[torch.nn.Parameter]  # the prepared U-Net's share of them (all its weights, or its adapters)

    @property
    def trained_models(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder) if m is not None]


def load_vae(config: TrainLDMConfig) -> AutoencoderKL | AutoencoderTiny:
    """The frozen VAE: AutoencoderKL, or AutoencoderTiny when the folder's config says so."""
    vae_config = AutoencoderKL.load_config(config.vae, subfolder=config.vae_subfolder)
    vae_cls = AutoencoderTiny if vae_config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    return vae_cls.from_pretrained(config.vae, subfolder=config.vae_subfolder)


def build_noise_scheduler(config: TrainLDMConfig, pretrained: dict | None = None) -> DDPMNoiseScheduler:
    """The pretrained checkpoint's noise process (`pretrained`: a `DDPMNoiseScheduler` config: betas, prediction type,
    steps offset, ...) or a fresh model's, with the `noise_scheduler` keys over it; a key that changes the checkpoint's
    is a deliberate change, and logged as one."""
    if pretrained is None:
        return DDPMNoiseScheduler(**(NEW_MODEL_NOISE_SCHEDULER | config.noise_scheduler))
    for key, value in config.noise_scheduler.items():
        if key in pretrained and pretrained[key] != value:
            logger.warning(
                f"noise_scheduler: {key}={value!r} replaces the pretrained checkpoint's {pretrained[key]!r}"
            )
    return DDPMNoiseScheduler.from_config(pretrained, **config.noise_scheduler)


def build_unet(config: TrainLDMConfig, vae, text_encoder, noise_scheduler: DDPMNoiseScheduler) -> ConditionalUNet:
    """A fresh U-Net from `unet_config`, sized for this VAE and text encoder."""
    in_channels = vae.config.latent_channels
    learns_variance = noise_scheduler.config.variance_type in ("learned", "learned_range")
    return ConditionalUNet.from_config(
        ConditionalUNet.load_config(config.unet_config),
        sample_size=config.resolution // vae_scale_factor(vae),
        addition_time_embed_dim=SIZE_CONDITIONING_DIM if config.size_conditioning else None,
        in_channels=in_channels,
        # The scheduler's learned variance needs a second set of channels (Nichol & Dhariwal 2021).
        out_channels=in_channels * (2 if learns_variance else 1),
        cross_attention_dim=text_encoder.config.hidden_size,
    )


def load_models(config: TrainLDMConfig) -> Models:
    """Frozen VAE, text encoder (frozen unless `train_text_encoder`), our noise scheduler, our U-Net: from the
    pretrained pipeline where there is one, unless `vae` / `text_encoder` name others."""
    pretrained = {}
    if config.pretrained_pipeline:
        from latentddpm.interop import load_pretrained_components  # imports Stable Diffusion's pipeline: when needed

        pretrained = load_pretrained_components(config.pretrained_pipeline, config.single_file_config)
    vae = (load_vae(config) if config.vae else pretrained["vae"]).eval().requires_grad_(False)
    if config.text_encoder is None and pretrained:
        tokenizer, text_encoder = pretrained["tokenizer"], pretrained["text_encoder"]
    else:
        tokenizer, text_encoder = load_text_encoder(config.text_encoder or default_text_encoder_path())
    if config.tokenizer_max_length is not None:
        tokenizer.model_max_length = config.tokenizer_max_length
    text_encoder.eval().requires_grad_(config.train_text_encoder)
    if getattr(text_encoder, "pooler", None) is not None:
        # BERT's pooler is not on the path to `last_hidden_state`: trained, it would get no gradient (and DDP fail).
        text_encoder.pooler.requires_grad_(False)
    noise_scheduler = build_noise_scheduler(config, pretrained.get("scheduler_config"))
    unet = pretrained["unet"] if pretrained else build_unet(config, vae, text_encoder, noise_scheduler)
    if config.size_conditioning and not unet.config.get("addition_time_embed_dim"):
        raise ConfigError(
            "Config key 'size_conditioning' needs a U-Net with 'addition_time_embed_dim' (a fresh model gets one); "
            "the pretrained pipeline's has none."
        )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers:
        import_optional("xformers", extra="xformers", feature="enable_xformers")
        unet.enable_xformers_memory_efficient_attention()
    logger.info(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    # How the pretrained model reads its prompts (Stable Diffusion: unmasked); masked padding for a new model.
    use_attention_mask = pretrained.get("use_attention_mask", True)
    if config.use_attention_mask is not None:
        if pretrained and config.use_attention_mask != use_attention_mask:
            logger.warning(f"use_attention_mask={config.use_attention_mask} replaces the pretrained pipeline's")
        use_attention_mask = config.use_attention_mask
    return Models(vae, tokenizer, text_encoder, noise_scheduler, unet, use_attention_mask)


def load_dreambooth_dataset(config: TrainLDMConfig, accelerator, models: Models) -> tuple[Dataset, str, int]:
    """DreamBooth's rows: the instance images, then (with prior preservation) the class images, which the pretrained
    pipeline generates now where they are missing. Returns a dataset of image paths and captions, its fingerprint
    and the number of class rows."""
    # Every image checked here (size included): the cache then skips none, which would shift class rows.
    rows = read_image_folder(config.instance_data, config.instance_prompt, config.min_image_size)
    class_rows = []
    if config.with_prior_preservation:
        settings = ClassImageSettings(
            prompts=tuple(read_prompts(config.class_prompt)),
            resolution=config.resolution,
            num_inference_steps=config.class_inference_steps,
            guidance_scale=config.class_guidance_scale,
            seed=config.seed,
            batch_size=config.sample_batch_size,
        )
        pipeline = models.pipeline().to(accelerator.device)  # the base: nothing has trained yet
        key = settings.key(pipeline)
        folder = config.class_data_dir or Path(config.cache_dir) / "class_images" / key
        with accelerator.main_process_first():
            class_rows = generate_class_images(
                pipeline, settings, key, config.num_class_images, folder, accelerator.is_local_main_process
            )
        logger.info(f"Class images: {len(class_rows)} in {folder}")
    rows += class_rows
    columns = {config.image_column: [str(path) for path, _ in rows], config.caption_column: [c for _, c in rows]}
    return Dataset.from_dict(columns), rows_fingerprint(rows), len(class_rows)


def bucket_histogram(rows_by_size: dict[tuple[int, int], torch.Tensor], factor: int) -> dict[str, int]:
    """`{"HxW": images}` of each latent size's rows, in pixels (`factor`: the VAE's)."""
    return {bucket_name((h * factor, w * factor)): len(rows) for (h, w), rows in rows_by_size.items()}


def build_cache(
    config: TrainLDMConfig, accelerator, models: Models, dataset: Dataset, folder: Path, buckets: list | None
) -> None:
    """Every process encodes its shards of the latent cache (resuming a killed build), then the main process writes
    the index that completes it."""
    build_latent_cache(
        dataset,
        folder,
        image_column=config.image_column,
        caption_column=config.caption_column,
        transform=ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=False),
        vae=models.vae,
        tokenizer=models.tokenizer,
        text_encoder=models.text_encoder,
        random_flip=config.random_flip,
        shard_size=config.cache_shard_size,
        dtype=getattr(torch, config.cache_dtype),
        cache_text=config.cache_text_embeddings,
        batch_size=config.dataloader_batch_size,
        device=accelerator.device,
        seed=config.seed,
        use_attention_mask=models.use_attention_mask,
        loss_mask=config.masked_loss,
        min_image_size=config.min_image_size,
        buckets=buckets,
        time_ids=config.size_conditioning,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        show_progress=accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        index = finish_latent_cache(folder)
        skipped = index["skipped"]
        logger.info(
            f"Data: skipped {sum(skipped.values())} of {index['num_source_rows']} images ({skipped['corrupt']} "
            f"corrupt, {skipped['too small']} too small)"
        )
    accelerator.wait_for_everyone()


def load_streamed_data(config: TrainLDMConfig, accelerator) -> Data:
    """`streaming`: the dataset as a stream, and the state of this process's stream, saved with every checkpoint."""
    streamed = config.load_dataset(config.seed, streaming=True)
    state = StreamingState(num_workers=config.dataloader_num_workers)
    state.register_for_checkpointing(accelerator)
    manifest = build_manifest(config_to_dict(config), config.seed, f"streaming:{config.dataset}")
    return Data(None, None, torch.arange(0), manifest, streamed=streamed, stream_state=state)


def micro_batch_loader(config: TrainLDMConfig, accelerator, data: Data, start: int) -> Iterator[dict]:
    """This process's micro-batches from micro-step `start` on, read ahead by `dataloader_num_workers`: drawn from the
    latent cache (`MicroBatches`), or streamed images and captions (`StreamingBatches`, from `data.stream_state`)."""
    num_workers, pin_memory = config.dataloader_num_workers, accelerator.device.type == "cuda"
    if data.streamed is None:
        batches = MicroBatches(data.cache, data.stream, config.seed, accelerator.process_index, config.caption_dropout)
        stop = config.max_train_steps * accelerator.gradient_accumulation_steps
        return iter(batches.loader(start, stop, num_workers, pin_memory))
    if data.stream_state.micro_step != start:
        raise ValueError(f"The stream stands at micro-step {data.stream_state.micro_step}, the run at {start}.")
    batches = StreamingBatches(
        data.streamed,
        ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=config.random_flip),
        per_process=config.train_batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        seed=config.seed,
        start_micro_step=start,
        positions=data.stream_state.positions,
        image_column=config.image_column,
        caption_column=config.caption_column,
        min_image_size=config.min_image_size,
        shuffle_buffer=config.shuffle_buffer,
    )
    batches.check_num_workers(num_workers)
    return iter(streaming_loader(batches, num_workers, pin_memory))


def load_data(config: TrainLDMConfig, accelerator, models: Models) -> Data:
    """The latent cache (built by every process, keyed by content), the row stream and held-out rows; or, with
    `streaming`, the streamed dataset."""
    if config.streaming:
        return load_streamed_data(config, accelerator)
    if config.masked_loss and models.noise_scheduler.config.variance_type in ("learned", "learned_range"):
        raise ConfigError("Config key 'masked_loss' does not work with a learned variance (its VLB is per sample).")
    models.vae.to(accelerator.device)
    models.text_encoder.to(accelerator.device)
    if config.instance_data is None:
        dataset = config.load_dataset(config.seed)
        fingerprint, num_class_rows = dataset_fingerprint(dataset), 0
    else:
        dataset, fingerprint, num_class_rows = load_dreambooth_dataset(config, accelerator, models)
    key_parts = dict(
        dataset=fingerprint,
        columns=[config.image_column, config.caption_column],
        vae=tensor_fingerprint(models.vae),
        text_encoder=tensor_fingerprint(models.text_encoder),
        max_length=models.tokenizer.model_max_length,
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        min_image_size=config.min_image_size,
        use_attention_mask=models.use_attention_mask,
    )
    if config.masked_loss:  # only then, so that the caches of earlier runs keep their keys
        key_parts["masked_loss"] = True
    key_parts |= dict(shard_size=config.cache_shard_size, dtype=config.cache_dtype, text=config.cache_text_embeddings)
    buckets = None
    if config.aspect_ratio_buckets:
        multiple = bucket_multiple(models.vae, models.unet)
        buckets = key_parts["buckets"] = aspect_ratio_buckets(config.resolution, multiple, config.max_aspect_ratio)
    if config.size_conditioning:
        key_parts["time_ids"] = True
    key = cache_key(**key_parts)
    folder = Path(config.cache_dir) / key
    if cache_is_complete(folder):
        logger.info(f"Reusing cached latents and text embeddings from {folder}")
    else:
        build_cache(config, accelerator, models, dataset, folder, buckets)
    cache = LatentCache(folder)
    logger.info(f"Cache: {len(cache)} images, latent stats {latent_stats(cache, models.vae)}")

    # The rows: training rows (DreamBooth's instance rows), then DreamBooth's class rows, then held-out rows.
    num_rows = len(cache) - num_class_rows - config.num_validation_samples
    if num_rows <= 0:
        raise ConfigError(f"num_validation_samples={config.num_validation_samples} leaves no training rows.")
    if buckets is None:
        stream = ShuffledStream(num_rows, config.train_batch_size, accelerator.num_processes, seed=config.seed)
    else:
        sizes = {size: rows[rows < num_rows] for size, rows in cache.rows_by_size().items()}
        factor = vae_scale_factor(models.vae)
        logger.info(f"Aspect-ratio buckets (height x width: images): {bucket_histogram(sizes, factor)}")
        stream = BucketedStream(list(sizes.values()), config.train_batch_size, accelerator.num_processes, config.seed)
    num_instance_rows = None
    if num_class_rows:  # each micro-batch: train_batch_size instance rows, then as many class rows
        class_stream = ShuffledStream(
            num_class_rows, config.train_batch_size, accelerator.num_processes, seed=config.seed + 1
        )
        stream, num_instance_rows = PairedStream(stream, class_stream, offset=num_rows), config.train_batch_size
    return Data(
        cache=cache,
        stream=stream,
        validation_rows=torch.arange(len(cache) - config.num_validation_samples, len(cache)),
        manifest=build_manifest(config_to_dict(config), config.seed, fingerprint, cache_key=key),
        num_instance_rows=num_instance_rows,
    )


def prepare_optimisation(config: TrainLDMConfig, accelerator, models: Models) -> Optimisation:
    """AdamW (or 8-bit AdamW) over the U-Net (and the text encoder), or over their LoRA adapters (added here, after
    the latent cache was keyed on the base weights), the LR schedule, EMA; wrapped by accelerate."""
    if config.lora_rank:
        adapter = partial(lora_config, alpha=config.lora_alpha, dropout=config.lora_dropout)
        add_unet_lora(models.unet, adapter(config.lora_rank, target_modules=config.lora_target_modules))
        if config.text_encoder_lora_rank:
            targets = text_encoder_lora_targets(models.text_encoder)
            add_text_encoder_lora(models.text_encoder, adapter(config.text_encoder_lora_rank, target_modules=targets))
    lr_scale = 1.0
    if config.scale_lr:
        lr_scale = accelerator.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    logger.info(f"Trainable U-Net parameters: {sum(p.numel() for p in unet_params) / 1e6:.3f}M")
    param_groups = [{"params": unet_params, "lr": config.learning_rate * lr_scale}]
    if config.text_encoder_trains:
        text_encoder_lr = config.text_encoder_learning_rate or config.learning_rate
        trainable = [p for p in models.text_encoder.parameters() if p.requires_grad]
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
    text_encoder = None
    if config.text_encoder_trains:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            models.unet, models.text_encoder, optimizer, lr_scheduler
        )
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    ema = None
    if config.use_ema:
        # Of the prepared U-Net's trained parameters (all, or the LoRA adapters): under FSDP and ZeRO-3, this
        # process's shards.
        ema = ShardedEMAModel(
            [p for p in unet.parameters() if p.requires_grad],
            update_every=config.ema_update_every,
            decay=config.ema_decay,
            use_ema_warmup=config.ema_warmup,
            power=config.ema_power,
        )
        ema.to(accelerator.device if config.ema_device == "accelerator" else "cpu")
        ema.register_for_checkpointing(accelerator)  # a shard file per process in every checkpoint
    # The optimizer's parameters after `prepare`: FSDP replaces them with its sharded ones.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    return Optimisation(unet, text_encoder, optimizer, lr_scheduler, ema, params, unet_params)


def text_conditioning(
    caption_ids: torch.Tensor, cache: LatentCache, models: Models, text_encoder: torch.nn.Module | None, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(hidden (B, S, D), mask (B, S) or None)` of caption rows on `device`: cached, or encoded now by `text_encoder`
    (the one being trained; None when it is frozen: then by the frozen one when the cache holds no text embeddings).
    The mask is None when cross-attention reads the padding too."""
    if text_encoder is None and cache.has_text:
        hidden, mask = cache.text(caption_ids)
        return hidden.to(device), mask.to(device) if models.use_attention_mask else None
    return encode_text([cache.prompt(i) for i in caption_ids.tolist()], models, text_encoder, device)


def encode_text(
    prompts: list[str], models: Models, text_encoder: torch.nn.Module | None, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(hidden, mask or None)` of `prompts`, encoded by `text_encoder` (being trained), else by the frozen one."""
    text_encoder = text_encoder or models.text_encoder
    hidden, mask = encode_prompt(
        prompts, models.tokenizer, text_encoder, device, use_attention_mask=models.use_attention_mask
    )
    return hidden.to(device), mask.to(device) if models.use_attention_mask else None


def step_inputs(
    config: TrainLDMConfig, accelerator, models: Models, data: Data, encoder, batch: dict, micro_step: int
) -> tuple[torch.Generator, dict[str, torch.Tensor | None]]:
    """The step generator to draw on (noise, timesteps) and the U-Net's inputs of one micro-batch from the loader: a
    cached batch's latents (drawn by the loader, its generator's state with them) and caption rows; or a streamed
    batch's pixels and captions, encoded now (the posterior sample and caption dropout drawn here)."""
    device = accelerator.device
    if data.streamed is None:
        generator = torch.Generator()
        generator.set_state(batch["generator_state"])
        latents = scale_latents(models.vae, batch["latents"])
        hidden, mask = text_conditioning(batch["caption_ids"], data.cache, models, encoder, device)
    else:
        generator = step_generator(config.seed, micro_step, accelerator.process_index)
        with torch.no_grad():
            mean, std = encode_posterior(models.vae, batch["pixels"].to(device, models.vae.dtype))
        eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
        latents = scale_latents(models.vae, mean + std * eps).float()
        dropped = (torch.rand(len(batch["captions"]), generator=generator) < config.caption_dropout).tolist()
        prompts = ["" if drop else caption for caption, drop in zip(batch["captions"], dropped)]
        hidden, mask = encode_text(prompts, models, encoder, device)
    latents = latents.to(device)
    return generator, {"latents": latents, "hidden": hidden, "mask": mask} | {
        key: batch.get(key) for key in ("loss_mask", "time_ids")
    }


def validate(config, accelerator, models, optimisation, data, state: RunState, ema, evaluation: bool) -> dict:
    """Validation (and evaluation) metrics now, on the main process; the models go back to train mode after."""
    step = state.global_step
    accelerator.log({"train_minutes": state.train_seconds / 60}, step=step)
    for model in optimisation.trained_models:
        model.eval()
    trained_encoder = models.text_encoder if config.text_encoder_trains else None
    metrics = run_validation(
        config,
        accelerator,
        models.unet,
        ema,
        models.pipeline,
        models.noise_scheduler,
        data.cache,
        data.validation_rows,
        models.vae,
        step,
        # Unwrapped: a DDP forward would wait for the other processes, which do not validate.
        text=partial(
            text_conditioning, cache=data.cache, models=models, text_encoder=trained_encoder, device=accelerator.device
        ),
    )
    if evaluation:
        metrics |= run_evaluation(
            config.evaluation_config, accelerator, models.unet, ema, models.pipeline, config.output_dir, step
        )
    for model in optimisation.trained_models:
        model.train()
    return metrics


def cache_main(argv: list[str] | None = None) -> Path:
    """Build the latent cache of a training config and stop (`latentddpm cache`): the same cache, key and folder as
    training's, which then opens it. Returns its folder."""
    config = parse_config(TrainLDMConfig, argv)
    accelerator = start_run(config)
    data = load_data(config, accelerator, load_models(config))
    accelerator.end_training()
    return Path(config.cache_dir) / data.manifest["cache_key"]


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TrainLDMConfig, argv)
    checkpoint = find_checkpoint(config)  # before anything loads: a wrong path fails in seconds
    accelerator = start_run(
        config,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dynamo_backend=config.dynamo_backend(),
    )
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    models = load_models(config)
    data = load_data(config, accelerator, models)
    opt = prepare_optimisation(config, accelerator, models)

    def write_extra(folder: Path) -> None:  # what a checkpoint holds besides accelerate's states and the EMA shards
        save_config(config, folder / "train_config.yaml")
        write_manifest(data.manifest, folder)

    text_encoder_adapters = models.text_encoder if config.text_encoder_lora_rank else None
    if config.lora_rank:
        checkpoint_adapters_only(accelerator, models.unet, text_encoder_adapters)
    hardware = hardware_description(accelerator)  # on every process: it gathers their device names
    uploader = None
    if config.push_to_hub:

        def write_hub_folder(folder: Path) -> None:  # what a checkpoint commits: the pipeline as it would be saved now
            with ema_weights(models.unet, opt.ema):
                save_trained(folder, config, models)
            write_card(folder, config, training_recipe(config, accelerator, data, opt, run.state, hardware))

        staging = Path(config.output_dir) / STAGING
        uploader = HubUploader(
            config.hub_model_id, config.hub_strategy, write_hub_folder, staging, private=config.hub_private_repo
        )
    run = TrainingRun(accelerator, config, write_extra, uploader)
    run.resume(checkpoint)  # the EMA shards too (`ShardedEMAModel.register_for_checkpointing`)
    if accelerator.is_main_process:
        accelerator.init_trackers("latentddpm", config=tracker_config(config))

    # The loop. One optimizer step = gradient_accumulation_steps micro-batches per process.
    state, accum, device = run.state, accelerator.gradient_accumulation_steps, accelerator.device
    objective = config.objective()
    encoder = opt.text_encoder  # the text encoder being trained, or None: cached embeddings
    progress = tqdm(
        total=config.max_train_steps,
        initial=state.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    batches = micro_batch_loader(config, accelerator, data, start=state.global_step * accum)
    # This session's: the share of the steps' time spent waiting for data is logged.
    data_seconds, step_seconds, first_step = 0.0, 0.0, state.global_step
    for model in opt.trained_models:
        model.train()
    with run:  # SIGTERM/SIGINT: finish the step, checkpoint, raise Preempted
        while state.global_step < config.max_train_steps:
            step_start = time.perf_counter()
            loss = torch.zeros((), device=device)
            for micro in range(accum):
                micro_step = state.global_step * accum + micro
                wait_start = time.perf_counter()
                batch = next(batches)  # read ahead by the loader's workers
                data_seconds += time.perf_counter() - wait_start
                if data.stream_state is not None:
                    data.stream_state.update(batch)
                seed_global_rng(config.seed, micro_step, accelerator.process_index)
                # accelerate holds back the gradient sync until the last micro-batch (DDP's no_sync; FSDP and
                # DeepSpeed their own) and scales the loss by 1 / accum in `backward`.
                with accelerator.accumulate(*opt.trained_models), accelerator.autocast():
                    generator, inputs = step_inputs(config, accelerator, models, data, encoder, batch, micro_step)
                    sample_losses, _ = training_losses(
                        opt.unet,
                        models.noise_scheduler,
                        inputs["latents"],
                        inputs["hidden"],
                        inputs["mask"],
                        objective,
                        generator,
                        inputs["loss_mask"],
                        inputs["time_ids"],
                    )
                    if data.num_instance_rows is None:
                        micro_loss = sample_losses.mean()
                    else:
                        micro_loss = prior_preservation_loss(
                            sample_losses, data.num_instance_rows, config.prior_loss_weight
                        )
                    accelerator.backward(micro_loss)
                loss += micro_loss.detach() / accum

            # Non-finite gradients (the same on every process after the all-reduce): skip the update, count it.
            grad_norm = accelerator.clip_grad_norm_(opt.params, config.max_grad_norm or math.inf)
            if run.should_step(grad_norm):
                opt.optimizer.step()
                if opt.ema is not None:
                    opt.ema.step(opt.unet_params)
            opt.optimizer.zero_grad(set_to_none=True)
            opt.lr_scheduler.step()
            state.global_step += 1
            step_seconds += time.perf_counter() - step_start
            state.train_seconds += time.perf_counter() - step_start
            progress.update(1)

            if state.global_step % config.log_every == 0 or state.global_step == config.max_train_steps:
                lrs = opt.lr_scheduler.get_last_lr()
                logs = {"loss": accelerator.reduce(loss, reduction="mean").item(), "lr": lrs[0]}
                logs |= {"lr_text_encoder": lrs[1]} if config.text_encoder_trains else {}
                logs |= {"grad_norm": grad_norm.item(), "train_minutes": state.train_seconds / 60}
                logs |= {"data_wait_share": data_seconds / step_seconds}
                if data.stream_state is not None:  # images the stream skipped (undecodable or too small), so far
                    logs |= {"skipped_images": sum(data.stream_state.skipped.values())}
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=state.global_step)
            run.checkpoint_if_due()
            if state.global_step < config.max_train_steps:
                evaluation = bool(config.evaluation_steps) and state.global_step % config.evaluation_steps == 0
                if evaluation or (config.validation_steps and state.global_step % config.validation_steps == 0):
                    validate(config, accelerator, models, opt, data, state, opt.ema, evaluation)
    progress.close()
    if step_seconds:
        steps = state.global_step - first_step
        logger.info(
            f"Waited for data {data_seconds / step_seconds:.1%} of the training steps' time ({steps} steps, "
            f"{step_seconds:.1f} s)"
        )
    return save(config, accelerator, models, opt, data, run, hardware)


def checkpoint_adapters_only(accelerator, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """Make the checkpoints of a LoRA run hold the adapters of `unet` (and `text_encoder`), in the run's final format,
    instead of the whole frozen models: accelerate's save and load of the prepared models are replaced by
    [`save_lora`] and [`load_lora`], as diffusers' LoRA examples do. The optimizer state is still accelerate's."""

    def save_adapters(prepared_models, weights: list, folder: str) -> None:
        if accelerator.is_main_process:
            save_lora(folder, unet, text_encoder)
        weights.clear()

    def load_adapters(prepared_models: list, folder: str) -> None:
        prepared_models.clear()
        load_lora(folder, unet, text_encoder)

    accelerator.register_save_state_pre_hook(save_adapters)
    accelerator.register_load_state_pre_hook(load_adapters)


def training_recipe(
    config: TrainLDMConfig, accelerator, data: Data, opt: Optimisation, state: RunState, hardware: str
) -> TrainingRecipe:
    """How the pipeline was trained up to `state`, for its model card."""
    return TrainingRecipe(
        dataset=config.dataset,
        num_images=data.num_rows,
        steps=state.global_step,
        max_train_steps=config.max_train_steps,
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        learning_rate=opt.optimizer.param_groups[0]["initial_lr"],  # the U-Net's peak, scaled when `scale_lr`
        lr_scheduler=config.lr_scheduler,
        mixed_precision=accelerator.mixed_precision,
        hardware=hardware,
        train_minutes=state.train_seconds / 60,
        base_model=config.pretrained_pipeline,
    )


def write_card(folder: Path, config: TrainLDMConfig, recipe: TrainingRecipe, grid=None, evaluation=None) -> Path:
    """The model card (`README.md`) of what `save_trained` wrote in `folder`, with the validation grid and the metrics
    of the evaluation (`metrics.json` of `latentddpm evaluate`) when there are any; a LoRA's card names its base, the
    trigger words (a DreamBooth run's `instance_prompt`) and how to load it."""
    if config.lora_rank:
        return write_lora_model_card(
            folder,
            repo_id=config.hub_model_id,
            base_model=config.pretrained_pipeline,
            trigger_words=[config.instance_prompt] if config.instance_prompt else None,
            sample_grid=grid,
            license=config.hub_license,
            extra_sections=training_sections(recipe, evaluation),
        )
    return write_training_model_card(
        folder,
        recipe,
        evaluation=evaluation,
        repo_id=config.hub_model_id,
        sample_grid=grid,
        training_config=config_to_dict(config),
        license=config.hub_license,
    )


def save_trained(folder: Path, config: TrainLDMConfig, models: Models) -> None:
    """What a run hands on, into `folder`: the whole pipeline, or for a LoRA run its adapters alone
    (`pytorch_lora_weights.safetensors`, diffusers' LoRA format)."""
    if config.lora_rank:
        save_lora(folder, models.unet, models.text_encoder if config.text_encoder_lora_rank else None)
    else:
        models.pipeline().save_pretrained(str(folder))


def save(
    config: TrainLDMConfig,
    accelerator,
    models: Models,
    opt: Optimisation,
    data: Data,
    run: TrainingRun,
    hardware: str,
) -> Path:
    """The pipeline with the EMA weights (or, for a LoRA run, the adapters alone), its config, manifest and model
    card, the final validation (and evaluation); with `push_to_hub`, committed after the pending checkpoint commits."""
    output_dir = Path(config.output_dir)
    accelerator.wait_for_everyone()
    if config.lora_rank:
        # The EMA goes into the adapters for good (they are saved, the base is not; LoRA is not sharded here).
        if opt.ema is not None:
            opt.ema.copy_to(opt.unet_params)
    else:
        with ema_weights(opt.unet, opt.ema):  # on every process: gathering FSDP's and ZeRO-3's shards is collective
            unet_state = accelerator.get_state_dict(opt.unet)
            if accelerator.is_main_process:
                # A fresh U-Net with the gathered weights (under FSDP and ZeRO-3 `models.unet` holds this process's
                # shards), copied before the trained weights are restored: unsharded, the state dict shares their
                # storage.
                unet = type(models.unet).from_config(models.unet.config)
                unet.load_state_dict(unet_state)
                models.unet = unet.to(accelerator.device)
    metrics = validate(config, accelerator, models, opt, data, run.state, None, config.evaluation_config is not None)
    if accelerator.is_main_process:
        save_trained(output_dir, config, models)
        save_config(config, output_dir / "train_config.yaml")
        final_metrics = {k: v for k, v in metrics.items() if k != "grid"}  # the grid is saved as a PNG
        final = {"final_metrics": final_metrics, "skipped_steps": run.state.skipped_steps}
        write_manifest(data.manifest | final, output_dir)
        evaluation = None
        if config.evaluation_config is not None:
            metrics_file = evaluation_dir(output_dir, run.state.global_step) / "metrics.json"
            evaluation = json.loads(metrics_file.read_text())
        recipe = training_recipe(config, accelerator, data, opt, run.state, hardware)
        write_card(output_dir, config, recipe, metrics.get("grid"), evaluation)
        what = "LoRA" if config.lora_rank else "pipeline"
        logger.info(f"Saved the {what} to {output_dir}")
        if run.uploader is not None:
            logger.info(f"Pushed the {what} to {run.uploader.push_final(output_dir)}")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    from latentddpm.cli import run_main

    run_main(main)
