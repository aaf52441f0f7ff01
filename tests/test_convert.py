"""Stable Diffusion import and export (`latentddpm.convert`), against diffusers' own `StableDiffusionPipeline`, on the
tiny random Stable Diffusion 1.x and 2.x pipelines of `tiny_sd`."""

import json

import pytest
import torch
from diffusers import (
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor
from tiny_sd import make_clip_tokenizer, make_stable_diffusion
from transformers import BertConfig, BertModel, CLIPTokenizer

from latentddpm import ConditionalUNet, LatentDDPMPipeline
from latentddpm.convert import (
    single_file_state_dict,
    to_stable_diffusion,
    unet_config_from_stable_diffusion,
)
from latentddpm.interop import load_pretrained_components
from latentddpm.interop import main as convert_main
from latentddpm.schedulers import DDPMNoiseScheduler

PROMPTS = ["a red circle", "a small blue square above a large green triangle"]
NEGATIVE = ["blurry", "a yellow star"]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return make_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def sd_pipe(request, clip_tokenizer) -> StableDiffusionPipeline:
    return make_stable_diffusion(request.param, clip_tokenizer)


def images(pipe, **kwargs) -> torch.Tensor:
    return pipe(
        PROMPTS,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images


def test_imported_pipeline_samples_the_images_of_stable_diffusion(sd_pipe):
    pipe = LatentDDPMPipeline.from_stable_diffusion(sd_pipe)
    assert isinstance(pipe.unet, ConditionalUNet) and pipe.config.use_attention_mask is False
    expected = images(sd_pipe)
    torch.testing.assert_close(images(pipe), expected, atol=1e-4, rtol=0)


def test_pretrained_components_carry_the_checkpoints_noise_process(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "sd")
    components = load_pretrained_components(tmp_path / "sd")
    assert type(components["scheduler"]) is type(sd_pipe.scheduler)
    assert isinstance(components["unet"], ConditionalUNet) and components["use_attention_mask"] is False
    training_scheduler = DDPMNoiseScheduler.from_config(components["scheduler_config"])
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset", "timestep_spacing"):
        assert training_scheduler.config[key] == sd_pipe.scheduler.config[key], key
    torch.testing.assert_close(training_scheduler.alphas_cumprod.float(), sd_pipe.scheduler.alphas_cumprod)


def public_config(model) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def test_export_of_an_imported_pipeline_holds_the_original_tensors_bitwise(sd_pipe):
    exported = LatentDDPMPipeline.from_stable_diffusion(sd_pipe).to_stable_diffusion()
    assert public_config(exported.unet) == public_config(sd_pipe.unet)
    for name in ("unet", "vae", "text_encoder"):
        original, roundtrip = getattr(sd_pipe, name).state_dict(), getattr(exported, name).state_dict()
        assert original.keys() == roundtrip.keys()
        for key, tensor in original.items():
            assert roundtrip[key].shape == tensor.shape and torch.equal(roundtrip[key], tensor), f"{name}.{key}"


def test_folder_round_trip_keeps_the_stable_diffusion_layout(sd_pipe, tmp_path):
    # The projection layout and `upcast_attention` are recorded in the U-Net's config and survive save/load.
    LatentDDPMPipeline.from_stable_diffusion(sd_pipe).save_pretrained(tmp_path / "ours")
    components = load_pretrained_components(tmp_path / "ours")
    assert components["use_attention_mask"] is False
    pipe = LatentDDPMPipeline(**{k: v for k, v in components.items() if k != "scheduler_config"})
    assert public_config(pipe.to_stable_diffusion().unet) == public_config(sd_pipe.unet)


def test_single_file_round_trip_through_diffusers_from_single_file_is_bitwise(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "sd")
    ckpt = tmp_path / "model.safetensors"
    convert_main([str(tmp_path / "sd"), "--to", "single-file", "--out", str(ckpt)])
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tmp_path / "sd"), safety_checker=None)
    pipe = LatentDDPMPipeline.from_stable_diffusion(loaded)
    imported = LatentDDPMPipeline.from_stable_diffusion(sd_pipe)
    for name in ("unet", "vae", "text_encoder"):
        original, roundtrip = getattr(imported, name).state_dict(), getattr(pipe, name).state_dict()
        assert original.keys() == roundtrip.keys()
        for key, tensor in original.items():
            assert torch.equal(roundtrip[key], tensor), f"{name}.{key}"


def test_single_file_keys_are_the_ldm_layout(sd_pipe):
    state_dict = single_file_state_dict(sd_pipe)
    proj_in = "model.diffusion_model.input_blocks.4.1.proj_in.weight"  # level 1, first ResNet's transformer
    assert state_dict[proj_in].ndim == (2 if sd_pipe.unet.config.use_linear_projection else 4)
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",  # level 0's downsampler
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # the upsampler after a transformer
        "model.diffusion_model.output_blocks.5.0.skip_connection.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in state_dict, key
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


@pytest.mark.parametrize(
    "key, value",
    [
        ("addition_embed_type", "text_time"),
        ("dual_cross_attention", True),
        ("time_cond_proj_dim", 32),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ],
)
def test_unsupported_unet_configs_fail_with_one_line_naming_the_key(sd_pipe, key, value):
    config = {**sd_pipe.unet.config, key: value}
    with pytest.raises(ValueError, match=rf"`{key}`") as error:
        unet_config_from_stable_diffusion(config)
    assert "\n" not in str(error.value)


def test_unsupported_hub_style_config_fails_from_the_cli(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "sd")
    config_path = tmp_path / "sd" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["addition_embed_type"] = "text_time"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`addition_embed_type`"):
        load_pretrained_components(tmp_path / "sd")


def make_bert_pipe(use_attention_mask: bool, sd_pipe: StableDiffusionPipeline) -> LatentDDPMPipeline:
    """Our kind of pipeline: a BERT text encoder (no `use_attention_mask` in its config) and our own U-Net."""
    torch.manual_seed(0)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(sd_pipe.tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=sd_pipe.tokenizer.model_max_length,
        )
    ).eval()
    unet = ConditionalUNet(
        sample_size=8,
        block_out_channels=(32, 64),
        attention_levels=(False, True),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    pipe = LatentDDPMPipeline(
        vae=sd_pipe.vae,
        text_encoder=text_encoder,
        tokenizer=sd_pipe.tokenizer,
        unet=unet,
        scheduler=sd_pipe.scheduler,
        use_attention_mask=use_attention_mask,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sd_pipe", [1], indirect=True, ids=["sd1"])
def test_bert_pipeline_with_attention_mask_refuses_export_saying_why(sd_pipe):
    with pytest.raises(ValueError, match="use_attention_mask=True") as error:
        to_stable_diffusion(make_bert_pipe(True, sd_pipe))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sd_pipe", [1], indirect=True, ids=["sd1"])
def test_bert_pipeline_without_attention_mask_exports_with_identical_images(sd_pipe):
    pipe = make_bert_pipe(False, sd_pipe)
    exported = pipe.to_stable_diffusion()
    torch.testing.assert_close(images(exported), images(pipe), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sd_pipe", [2], indirect=True, ids=["sd2"])
def test_export_matches_with_the_classic_attention_processor(sd_pipe):
    # The classic processor reads `upcast_attention`; in fp32 it changes nothing, so both agree here too.
    pipe = LatentDDPMPipeline.from_stable_diffusion(sd_pipe)
    exported = pipe.to_stable_diffusion()
    pipe.unet.set_attn_processor(AttnProcessor())
    exported.unet.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(images(pipe), images(exported), atol=1e-4, rtol=0)
