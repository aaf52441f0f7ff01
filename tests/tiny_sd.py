"""Tiny random Stable Diffusion 1.x and 2.x pipelines built from configs, as diffusers' fast tests build them, with a
CLIP tokenizer whose vocabulary (the 256 byte symbols, no merges) is written here: nothing is downloaded."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, the alphabet of CLIP's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (each also as a word end, `</w>`), padded to 77 tokens as SD pads."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def make_stable_diffusion(version: int, tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """A tiny random SD 1.x (conv projections, 8 heads, epsilon, PNDM) or 2.x (linear projections, per-level heads,
    upcast attention, v-prediction, DDIM) pipeline, 8x8 latents, 16x16 images."""
    torch.manual_seed(0)
    sd2 = version == 2
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if sd2:
        scheduler = DDIMScheduler(
            **schedule, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
        )
    else:
        scheduler = PNDMScheduler(**schedule, skip_prk_steps=True)
    sd_pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd_pipe.set_progress_bar_config(disable=True)
    return sd_pipe
