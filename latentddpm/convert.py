"""Stable Diffusion in and out: diffusers `StableDiffusionPipeline`s and single-file checkpoints <-> latentddpm.

`ConditionalUNet` has the module names of diffusers' `UNet2DConditionModel`, so a U-Net converts by translating its
config and reshaping two kinds of weights: Stable Diffusion 1.x stores the spatial transformers' `proj_in`/`proj_out`
as 1x1 convolutions, `(C, C, 1, 1)`, where ours are linear, `(C, C)`; and `UNet2DConditionModel`'s
`attention_head_dim` counts heads where ours counts channels per head (diffusers issue #2011). The VAE, the text
encoder, the tokenizer and the scheduler are diffusers and transformers models that both pipelines share as they are.

The single-file format is the original LDM/CompVis checkpoint layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`) that single-file UIs and diffusers' `from_single_file` load.
The key maps here are written from `UNetModel` of the latent-diffusion repository and mirror diffusers'
`loaders/single_file_utils.py`, which reads them back.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from latentddpm.models import ConditionalUNet
from latentddpm.models.unet_conditional import to_unet2d_condition_config
from latentddpm.schedulers import DDPMNoiseScheduler

if TYPE_CHECKING:  # the pipeline module imports this one (from_stable_diffusion, to_stable_diffusion)
    from latentddpm.pipelines import LatentDDPMPipeline

# `UNet2DConditionModel` config keys that `ConditionalUNet` can only express at one value (SDXL's added embeddings,
# dual cross-attention, LCM's timestep conditioning, ...), with that value.
_FIXED_UNET_KEYS: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}

# Private `ConditionalUNet` config key (saved with it, not an `__init__` argument) recording how Stable Diffusion
# stored the imported U-Net, so that it exports as it came: `use_linear_projection` (SD 2.x) or 1x1-conv projections
# (SD 1.x), and `upcast_attention`, which only the classic attention processor reads (our U-Net, like diffusers'
# default `AttnProcessor2_0`, runs PyTorch's SDPA and ignores it).
_SD_LAYOUT_KEY = "_stable_diffusion_layout"

# Prefixes of the three models in a single-file checkpoint.
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_TEXT = "cond_stage_model.transformer.text_model."


def _fixed_value_matches(value: Any, expected: Any) -> bool:
    # `only_cross_attention` may be given per level.
    if isinstance(value, (list, tuple)) and not isinstance(expected, (list, tuple)):
        return all(v == expected for v in value)
    return value == expected


def unet_config_from_stable_diffusion(sd_config: Mapping[str, Any]) -> dict[str, Any]:
    r"""
    The `ConditionalUNet` arguments of a Stable Diffusion `UNet2DConditionModel` config.

    Args:
        sd_config (`Mapping`): `unet.config` of a `UNet2DConditionModel` (or its `config.json`).

    Returns:
        `dict` of keyword arguments for `ConditionalUNet`.

    Raises:
        `ValueError`: one line naming the first key `ConditionalUNet` cannot express.
    """
    for key, expected in _FIXED_UNET_KEYS.items():
        if key in sd_config and not _fixed_value_matches(sd_config[key], expected):
            raise ValueError(
                f"Cannot convert the U-Net: `{key}`={sd_config[key]!r} has no ConditionalUNet equivalent (only "
                f"{expected!r})."
            )
    down_types, up_types = list(sd_config["down_block_types"]), list(sd_config["up_block_types"])
    for key, types, allowed in (
        ("down_block_types", down_types, _DOWN_BLOCKS),
        ("up_block_types", up_types, _UP_BLOCKS),
    ):
        unknown = [t for t in types if t not in allowed]
        if unknown:
            raise ValueError(f"Cannot convert the U-Net: `{key}` has {unknown}; only {list(allowed)} convert.")
    attention_levels = tuple(_DOWN_BLOCKS[t] for t in down_types)
    if tuple(_UP_BLOCKS[t] for t in reversed(up_types)) != attention_levels:
        raise ValueError(
            f"Cannot convert the U-Net: `up_block_types`={up_types} must mirror `down_block_types`={down_types}."
        )
    if sd_config["mid_block_type"] not in _MID_BLOCKS:
        raise ValueError(
            f"Cannot convert the U-Net: `mid_block_type`={sd_config['mid_block_type']!r}; only {list(_MID_BLOCKS)}."
        )
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(sd_config[key], int):
            raise ValueError(f"Cannot convert the U-Net: `{key}`={sd_config[key]!r} must be one int for all levels.")

    channels = tuple(sd_config["block_out_channels"])
    heads = sd_config["attention_head_dim"]  # the number of heads, despite the name (diffusers issue #2011)
    heads = (heads,) * len(channels) if isinstance(heads, int) else tuple(heads)
    # Levels without attention keep a head count that may not divide their channels; any head dimension will do.
    head_dims = tuple(c // h if c % h == 0 else c for c, h in zip(channels, heads))
    return {
        "sample_size": sd_config["sample_size"],
        "in_channels": sd_config["in_channels"],
        "out_channels": sd_config["out_channels"],
        "flip_sin_to_cos": sd_config["flip_sin_to_cos"],
        "freq_shift": sd_config["freq_shift"],
        "block_out_channels": channels,
        "attention_levels": attention_levels,
        "mid_block_attention": _MID_BLOCKS[sd_config["mid_block_type"]],
        "layers_per_block": sd_config["layers_per_block"],
        "transformer_layers_per_block": sd_config["transformer_layers_per_block"],
        "attention_head_dim": head_dims[0] if len(set(head_dims)) == 1 else head_dims,
        "cross_attention_dim": sd_config["cross_attention_dim"],
        "norm_num_groups": sd_config["norm_num_groups"],
        "norm_eps": sd_config["norm_eps"],
        "dropout": sd_config["dropout"],
        "act_fn": sd_config["act_fn"],
        "resnet_time_scale_shift": sd_config["resnet_time_scale_shift"],
        "num_class_embeds": sd_config["num_class_embeds"],
    }


def unet_config_to_stable_diffusion(config: Mapping[str, Any]) -> dict[str, Any]:
    r"""
    The `UNet2DConditionModel` arguments of a `ConditionalUNet` config, with the projection layout and
    `upcast_attention` it was imported with (linear projections and no upcast for a U-Net trained here).

    Args:
        config (`Mapping`): `unet.config` of a `ConditionalUNet`.

    Returns:
        `dict` of keyword arguments for `UNet2DConditionModel`.
    """
    sd_config = to_unet2d_condition_config(config)
    heads = sd_config["attention_head_dim"]
    if len(set(heads)) == 1:  # an int, as Stable Diffusion 1.x's config has it
        sd_config["attention_head_dim"] = heads[0]
    layout = config.get(_SD_LAYOUT_KEY, {})
    sd_config["use_linear_projection"] = layout.get("use_linear_projection", True)
    sd_config["upcast_attention"] = layout.get("upcast_attention", False)
    return sd_config


def _is_projection(key: str) -> bool:
    """Whether `key` is the weight of a spatial transformer's `proj_in` or `proj_out` in a U-Net state dict."""
    return ".attentions." in key and key.endswith((".proj_in.weight", ".proj_out.weight"))


def unet_from_stable_diffusion(sd_unet: UNet2DConditionModel) -> ConditionalUNet:
    r"""
    The `ConditionalUNet` with the architecture and weights of a Stable Diffusion U-Net.

    The weights are shared with `sd_unet`, not copied (1x1-conv projections become views of shape `(C, C)`).

    Args:
        sd_unet (`UNet2DConditionModel`): the U-Net of a Stable Diffusion 1.x or 2.x pipeline.

    Returns:
        `ConditionalUNet` in eval mode, on `sd_unet`'s device and dtype.

    Raises:
        `ValueError`: one line naming the config key `ConditionalUNet` cannot express.
    """
    config = unet_config_from_stable_diffusion(sd_unet.config)
    state_dict = {
        key: value[:, :, 0, 0] if _is_projection(key) and value.ndim == 4 else value
        for key, value in sd_unet.state_dict().items()
    }
    # Built on the meta device: the weights come from `state_dict`, so random initialization would be wasted work.
    with torch.device("meta"):
        unet = ConditionalUNet(**config)
    unet.load_state_dict(state_dict, strict=True, assign=True)
    unet.register_to_config(
        **{
            _SD_LAYOUT_KEY: {
                "use_linear_projection": sd_unet.config.use_linear_projection,
                "upcast_attention": sd_unet.config.upcast_attention,
            }
        }
    )
    return unet.eval()


def unet_to_stable_diffusion(unet: ConditionalUNet) -> UNet2DConditionModel:
    r"""
    The `UNet2DConditionModel` with the architecture and weights of a `ConditionalUNet` (weights shared, not copied).

    Args:
        unet (`ConditionalUNet`): our U-Net.

    Returns:
        `UNet2DConditionModel` in eval mode, on `unet`'s device and dtype.
    """
    sd_config = unet_config_to_stable_diffusion(unet.config)
    state_dict = unet.state_dict()
    if not sd_config["use_linear_projection"]:
        state_dict = {
            key: value[:, :, None, None] if _is_projection(key) else value for key, value in state_dict.items()
        }
    with torch.device("meta"):
        sd_unet = UNet2DConditionModel(**sd_config)
    sd_unet.load_state_dict(state_dict, strict=True, assign=True)
    return sd_unet.eval()


def _load_stable_diffusion(
    source: str | os.PathLike | StableDiffusionPipeline, single_file_config: str | os.PathLike | None
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from an instance, a diffusers folder or Hub id, or a single file plus its config."""
    if isinstance(source, StableDiffusionPipeline):
        return source
    if Path(source).is_file():
        if single_file_config is None:
            raise ValueError(
                f"{source} is a single-file checkpoint: pass `single_file_config`, a diffusers Stable Diffusion "
                "folder or Hub id with the configs of its models."
            )
        return StableDiffusionPipeline.from_single_file(
            str(source), config=str(single_file_config), safety_checker=None, requires_safety_checker=False
        )
    # Checked before diffusers builds the U-Net, which fails on some such configs with a less helpful message.
    unet_config_from_stable_diffusion(UNet2DConditionModel.load_config(source, subfolder="unet"))
    return StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)


def stable_diffusion_components(
    source: str | os.PathLike | StableDiffusionPipeline, single_file_config: str | os.PathLike | None = None
) -> dict[str, Any]:
    r"""
    The arguments of the `LatentDDPMPipeline` that samples as a Stable Diffusion pipeline does.

    The VAE, text encoder, tokenizer and scheduler are the Stable Diffusion pipeline's own objects; the U-Net is a
    `ConditionalUNet` sharing its weights; `use_attention_mask=False` encodes prompts as Stable Diffusion does (padded
    to the tokenizer's length, no cross-attention mask).

    Args:
        source (`str`, `os.PathLike` or `StableDiffusionPipeline`): a pipeline, a diffusers folder or Hub id, or a
            single-file checkpoint (`.safetensors`).
        single_file_config (`str` or `os.PathLike`, *optional*): for a single file, a diffusers folder or Hub id
            with the configs of its models.

    Returns:
        `dict` with `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler` and `use_attention_mask`.
    """
    sd_pipe = _load_stable_diffusion(source, single_file_config)
    if getattr(sd_pipe, "image_encoder", None) is not None:
        raise ValueError("Cannot convert the pipeline: `image_encoder` (IP-Adapter) has no latentddpm equivalent.")
    return {
        "vae": sd_pipe.vae,
        "text_encoder": sd_pipe.text_encoder,
        "tokenizer": sd_pipe.tokenizer,
        "unet": unet_from_stable_diffusion(sd_pipe.unet),
        "scheduler": sd_pipe.scheduler,
        "use_attention_mask": False,
    }


def to_stable_diffusion(pipe: "LatentDDPMPipeline") -> StableDiffusionPipeline:
    r"""
    The `StableDiffusionPipeline` (no safety checker) with the same models as `pipe`, sampling the same images.

    Our `DDPMNoiseScheduler` becomes diffusers' `DDPMScheduler` with the same config, so that the pipeline loads
    where latentddpm is not installed; other schedulers are diffusers' already and are kept.

    Args:
        pipe (`LatentDDPMPipeline`): the pipeline to export.

    Returns:
        `StableDiffusionPipeline` sharing the VAE, text encoder, tokenizer and U-Net weights with `pipe`.

    Raises:
        `ValueError`: one line saying what Stable Diffusion cannot express, e.g. a pipeline that masks prompt
        padding in cross-attention, which Stable Diffusion's pipeline does not.
    """
    if pipe.config.use_attention_mask:
        raise ValueError(
            "Cannot export to Stable Diffusion: this pipeline has use_attention_mask=True (prompt padding is masked "
            "in the text encoder and the U-Net's cross-attention) and StableDiffusionPipeline passes no such mask, so "
            "its images would differ; train with use_attention_mask=False for a Stable-Diffusion-compatible model."
        )
    if not isinstance(pipe.vae, AutoencoderKL) or pipe.vae.config.get("shift_factor") not in (None, 0):
        raise ValueError(
            "Cannot export to Stable Diffusion: StableDiffusionPipeline takes an AutoencoderKL without a "
            f"`shift_factor`; this pipeline has {type(pipe.vae).__name__} with shift_factor="
            f"{pipe.vae.config.get('shift_factor')}."
        )
    unet_config = pipe.unet.config
    if unet_config.out_channels != unet_config.in_channels:
        raise ValueError(
            f"Cannot export to Stable Diffusion: the U-Net's `out_channels`={unet_config.out_channels} (a learned "
            "variance) differs from `in_channels`; StableDiffusionPipeline would guide the variance channels too."
        )
    scheduler: SchedulerMixin = pipe.scheduler
    if isinstance(scheduler, DDPMNoiseScheduler):
        scheduler = DDPMScheduler.from_config(scheduler.config)
    return StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet_to_stable_diffusion(pipe.unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _unet_ldm_prefixes(sd_config: Mapping[str, Any]) -> dict[str, str]:
    r"""
    Diffusers -> LDM prefixes of a `UNet2DConditionModel`'s blocks, from the block order of LDM's `UNetModel`:
    `input_blocks` (conv_in, then per level each ResNet with its transformer, then the downsampler), `middle_block`,
    `output_blocks` (per level, deepest first, each ResNet with its transformer, the upsampler in the last one).
    """
    levels = [t == "CrossAttnDownBlock2D" for t in sd_config["down_block_types"]]
    layers = sd_config["layers_per_block"]
    prefixes = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "class_embedding.": "label_emb.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    block = 1
    for level in range(len(levels)):
        for j in range(layers):
            prefixes[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
            block += 1
        if level < len(levels) - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{block}.0.op."
            block += 1
    block = 0
    for up, attention in enumerate(reversed(levels)):
        for j in range(layers + 1):
            prefixes[f"up_blocks.{up}.resnets.{j}."] = f"output_blocks.{block}.0."
            prefixes[f"up_blocks.{up}.attentions.{j}."] = f"output_blocks.{block}.1."
            block += 1
        if up < len(levels) - 1:
            prefixes[f"up_blocks.{up}.upsamplers.0."] = f"output_blocks.{block - 1}.{2 if attention else 1}."
    return prefixes


# Diffusers -> LDM names inside a U-Net ResNet block.
_LDM_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _vae_ldm_prefixes(vae_config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers -> LDM prefixes of an `AutoencoderKL`'s blocks (LDM numbers the decoder levels bottom-up)."""
    num_levels = len(vae_config["block_out_channels"])
    layers = vae_config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for level in range(num_levels):
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0."] = f"encoder.down.{level}.downsample."
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{num_levels - 1 - level}.block.{j}."
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0."] = f"decoder.up.{num_levels - 1 - level}.upsample."
    return prefixes


# Diffusers -> LDM names inside the VAE's middle attention (LDM's q, k, v, proj_out are 1x1 convolutions).
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str]) -> str:
    """`key` with its longest matching prefix replaced and, inside it, the module name (before the last dot) mapped."""
    matches = [prefix for prefix in prefixes if key.startswith(prefix)]
    if not matches:
        return key
    prefix = max(matches, key=len)
    module, _, name = key[len(prefix) :].rpartition(".")
    return f"{prefixes[prefix]}{inner.get(module, module)}.{name}" if module else prefixes[prefix] + name


def single_file_state_dict(sd_pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    r"""
    The U-Net, VAE and CLIP text encoder of a Stable Diffusion pipeline in the original LDM/CompVis key layout.

    Args:
        sd_pipe (`StableDiffusionPipeline`): e.g. the result of [`to_stable_diffusion`].

    Returns:
        `dict` of contiguous tensors, ready for `safetensors.torch.save_file`.
    """
    if type(sd_pipe.text_encoder).__name__ != "CLIPTextModel":
        raise ValueError(
            "Cannot write a single-file checkpoint: its `cond_stage_model` layout holds a CLIPTextModel, not a "
            f"{type(sd_pipe.text_encoder).__name__}; save the diffusers folder instead (--to stable-diffusion)."
        )
    state_dict = {}
    unet_prefixes = _unet_ldm_prefixes(sd_pipe.unet.config)
    for key, value in sd_pipe.unet.state_dict().items():
        inner = _LDM_UNET_RESNET if ".resnets." in key else {}
        state_dict[_LDM_UNET + _rename(key, unet_prefixes, inner)] = value
    vae_prefixes = _vae_ldm_prefixes(sd_pipe.vae.config)
    for key, value in sd_pipe.vae.state_dict().items():
        inner = {"conv_shortcut": "nin_shortcut"} if ".resnets." in key else {}
        if ".mid_block.attentions." in key:
            inner = _LDM_VAE_ATTENTION
            if value.ndim == 2:  # linear -> 1x1 convolution
                value = value[:, :, None, None]
        state_dict[_LDM_VAE + _rename(key, vae_prefixes, inner)] = value
    for key, value in sd_pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened `CLIPTextModel`; the LDM layout keeps its `text_model.` level.
        state_dict[_LDM_TEXT + key.removeprefix("text_model.")] = value
    return {key: value.contiguous() for key, value in state_dict.items()}


def save_single_file(sd_pipe: StableDiffusionPipeline, path: str | os.PathLike) -> None:
    """Write [`single_file_state_dict`] of `sd_pipe` to one `.safetensors` file."""
    save_file(single_file_state_dict(sd_pipe), str(path), metadata={"format": "pt"})
