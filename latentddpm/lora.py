"""LoRA adapters for fine-tuning (Hu et al. 2021, https://arxiv.org/abs/2106.09685), with peft as diffusers'
`train_text_to_image_lora.py` does: add them to the U-Net (and the text encoder), save and restore them in diffusers'
LoRA format (`pytorch_lora_weights.safetensors`, which `load_lora_weights` of our pipeline and of Stable Diffusion's
reads); `train_ldm` writes their model card and pushes them (see `latentddpm.hub`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft

from .optional import import_optional
from .pipelines import LatentDDPMPipeline

if TYPE_CHECKING:
    import peft

# The attention projections of the U-Net's transformer blocks (self- and cross-attention), as in diffusers' examples.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The attention projections of each text encoder family, by `text_encoder.config.model_type`. CLIP's only: diffusers'
# LoRA format (`load_lora_weights`, `convert_state_dict_to_peft`) knows no other text encoder's layer names.
TEXT_ENCODER_LORA_TARGETS = {"clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"]}
ADAPTER_NAME = "default"  # peft's, and the one `get_peft_model_state_dict` reads


def text_encoder_lora_targets(text_encoder: torch.nn.Module) -> list[str]:
    """The attention projections of `text_encoder` that LoRA adapts.

    Raises:
        ValueError: a text encoder family without an entry in `TEXT_ENCODER_LORA_TARGETS`.
    """
    model_type = text_encoder.config.model_type
    if model_type not in TEXT_ENCODER_LORA_TARGETS:
        raise ValueError(
            f"Text-encoder LoRA supports {sorted(TEXT_ENCODER_LORA_TARGETS)} text encoders (the ones diffusers' LoRA "
            f"format knows), not {model_type!r}."
        )
    return TEXT_ENCODER_LORA_TARGETS[model_type]


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> peft.LoraConfig:
    """peft's config of a LoRA of `rank` on `target_modules` (module names or name suffixes), as diffusers' examples
    make it: the update of a layer is `alpha / rank * B A` (`alpha=None`: `rank`, a scale of 1), with A Gaussian and
    B zero at the start, so the model's outputs are unchanged until it trains; `dropout` on the LoRA branch's input."""
    peft = import_optional("peft", extra="lora", feature="LoRA (lora_rank)")
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


def add_unet_lora(unet: torch.nn.Module, config: peft.LoraConfig) -> None:
    """Freeze `unet` and add the trainable LoRA layers of `config` (diffusers' `add_adapter`, adapter "default")."""
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)


def add_text_encoder_lora(text_encoder: torch.nn.Module, config: peft.LoraConfig) -> None:
    """Freeze `text_encoder` and add the trainable LoRA layers of `config` with peft itself: transformers 5's
    `add_adapter` wants peft >= 0.22, peft's `inject_adapter_in_model` makes the same layers."""
    peft = import_optional("peft", extra="lora", feature="LoRA (text_encoder_lora_rank)")
    text_encoder.requires_grad_(False)
    peft.inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)


def lora_state_dicts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict:
    """The keyword arguments of `save_lora_weights` for the adapters of `unet` (and `text_encoder`, when it has
    adapters too): their weights in
    diffusers' format and their peft configs as metadata (so `load_lora_weights` rebuilds the same rank and alpha)."""
    peft = import_optional("peft", extra="lora", feature="LoRA (lora_rank)")
    kwargs = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(model))
            kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config[ADAPTER_NAME].to_dict()
    return kwargs


def save_lora(folder: str | os.PathLike, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write the adapters of `unet` (and `text_encoder`) to `folder/pytorch_lora_weights.safetensors`.

    Returns:
        `Path`: the written file.
    """
    LatentDDPMPipeline.save_lora_weights(folder, **lora_state_dicts(unet, text_encoder), safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME_SAFE


def load_lora(folder: str | os.PathLike, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> None:
    """Set the adapters that [`save_lora`] wrote into the adapters already on `unet` (and `text_encoder`), in place:
    what resuming a LoRA run needs (`load_lora_weights` would add new adapters instead).

    Raises:
        ValueError: the file and the models' adapters do not hold the same layers.
    """
    peft = import_optional("peft", extra="lora", feature="LoRA (lora_rank)")
    state_dict, _ = LatentDDPMPipeline.lora_state_dict(folder)
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = peft.set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state_dict), ADAPTER_NAME)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: LoRA weights for layers the U-Net has no adapter on: {result.unexpected_keys}")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)
