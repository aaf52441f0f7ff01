"""`latentddpm.latents` (VAE scaling, encoding, decoding) and `latentddpm.text` (prompt encoding)."""

import logging

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
)

from latentddpm.latents import decode_latents, encode_images, scale_latents, unscale_latents, vae_scale_factor
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder


def tiny_vae_kl(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        **config,
    ).eval()


def tiny_vae_tiny() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=4,
        scaling_factor=0.7,
    ).eval()


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand((batch, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_text_encoder_path())


def tiny_bert(tokenizer) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    return BertModel(config).eval()


@pytest.mark.parametrize("make_vae, factor", [(tiny_vae_kl, 4), (tiny_vae_tiny, 4)])
def test_vae_scale_factor_is_the_encoders_downsampling(make_vae, factor):
    vae = make_vae()
    with torch.no_grad():
        latents = encode_images(vae, pixels())
    assert vae_scale_factor(vae) == factor and latents.shape == (2, 4, 16 // factor, 16 // factor)


def test_scale_latents_with_shift_factor_and_unscale_round_trip():
    vae = tiny_vae_kl(scaling_factor=0.3, shift_factor=0.1)
    latents = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(scale_latents(vae, latents), (latents - 0.1) * 0.3)
    torch.testing.assert_close(unscale_latents(vae, scale_latents(vae, latents)), latents)


def test_scale_latents_without_shift_factor_only_scales():
    vae = tiny_vae_kl(scaling_factor=0.3)
    assert vae.config.shift_factor is None
    latents = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(scale_latents(vae, latents), latents * 0.3)


def test_encode_images_scales_the_posterior_sample_or_its_mean():
    vae = tiny_vae_kl(scaling_factor=0.3, shift_factor=0.1)
    with torch.no_grad():
        posterior = vae.encode(pixels()).latent_dist
        mean = encode_images(vae, pixels(), sample_posterior=False)
        sample = encode_images(vae, pixels(), generator=torch.Generator().manual_seed(1))
        again = encode_images(vae, pixels(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mean, (posterior.mean - 0.1) * 0.3)
    expected = (posterior.sample(torch.Generator().manual_seed(1)) - 0.1) * 0.3
    torch.testing.assert_close(sample, expected)
    assert torch.equal(sample, again) and not torch.allclose(sample, mean)


@pytest.mark.parametrize("make_vae", [tiny_vae_kl, tiny_vae_tiny])
def test_decode_latents_unscales_decodes_and_clamps(make_vae):
    vae = make_vae()
    latents = 20 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = decode_latents(vae, latents)
        expected = vae.decode(unscale_latents(vae, latents)).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_encode_images_of_autoencoder_tiny_scales_its_latents():
    vae = tiny_vae_tiny()
    with torch.no_grad():
        latents = encode_images(vae, pixels())
        torch.testing.assert_close(latents, vae.encode(pixels()).latents * 0.7)


def test_encode_prompt_pads_to_max_length_and_masks_padding(tokenizer):
    text_encoder = tiny_bert(tokenizer)
    prompts = ["a red circle", ""]
    hidden_states, mask = encode_prompt(prompts, tokenizer, text_encoder, max_length=10)
    assert hidden_states.shape == (2, 10, 32) and mask.dtype == torch.long
    # [CLS] a red circle [SEP]; the empty prompt is [CLS] [SEP]
    assert mask.sum(1).tolist() == [5, 2]
    ids = tokenizer(prompts, padding="max_length", max_length=10, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden_states.detach(), expected)


def test_encode_prompt_defaults_to_the_tokenizer_max_length(tokenizer):
    hidden_states, mask = encode_prompt(["a red circle"], tokenizer, tiny_bert(tokenizer))
    assert mask.shape == (1, tokenizer.model_max_length) == (1, 512)


def test_encode_prompt_warns_how_many_tokens_truncation_dropped(tokenizer, caplog):
    long_prompt = " ".join(["circle"] * 20)  # 20 tokens + [CLS] + [SEP]
    with caplog.at_level(logging.WARNING, logger="latentddpm.text"):
        encode_prompt(["short", long_prompt], tokenizer, tiny_bert(tokenizer), max_length=8)
    assert "1 of 2 prompts are longer than max_length=8 tokens" in caplog.text
    assert "dropping up to 14 tokens" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentddpm.text"):
        encode_prompt(["short"], tokenizer, tiny_bert(tokenizer), max_length=8)
    assert caplog.text == ""


def test_encode_prompt_refuses_a_tokenizer_without_length_limit(tokenizer):
    unlimited = AutoTokenizer.from_pretrained(default_text_encoder_path(), model_max_length=int(1e30))
    with pytest.raises(
        ValueError,
        match="model_max_length` is 1000000000000000019884624838656, which means the tokenizer sets no limit",
    ):
        encode_prompt(["a"], unlimited, tiny_bert(tokenizer))
    assert encode_prompt(["a"], unlimited, tiny_bert(tokenizer), max_length=6)[1].shape == (1, 6)


def tiny_clip(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2
    )
    return CLIPTextModel(config).eval()


def tiny_t5(vocab_size: int) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=37, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


@pytest.mark.parametrize("make_encoder", [tiny_clip, tiny_t5])
def test_encode_prompt_works_for_clip_and_t5_encoders(tokenizer, make_encoder):
    text_encoder = make_encoder(tokenizer.vocab_size)
    hidden_states, mask = encode_prompt(["a red circle", ""], tokenizer, text_encoder, max_length=8)
    ids = tokenizer(["a red circle", ""], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden_states.detach(), expected)


@pytest.mark.parametrize("make_encoder, encoder_class", [(tiny_clip, CLIPTextModel), (tiny_t5, T5EncoderModel)])
def test_load_text_encoder_picks_the_text_encoder_class(tokenizer, tmp_path, make_encoder, encoder_class):
    make_encoder(tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer, text_encoder = load_text_encoder(tmp_path, torch_dtype=torch.float16)
    assert type(text_encoder) is encoder_class and text_encoder.dtype == torch.float16 and not text_encoder.training
    assert loaded_tokenizer("a red circle").input_ids == tokenizer("a red circle").input_ids


def test_load_text_encoder_loads_the_default_minilm():
    tokenizer, text_encoder = load_text_encoder(default_text_encoder_path())
    assert isinstance(text_encoder, BertModel) and text_encoder.config.hidden_size == 384
    hidden_states, mask = encode_prompt(["a red circle above a blue square"], tokenizer, text_encoder, max_length=16)
    assert hidden_states.shape == (1, 16, 384) and torch.isfinite(hidden_states).all()


@pytest.mark.parametrize("encoder_uses_mask", [False, True])
def test_encode_prompt_without_attention_mask_matches_stable_diffusion(tokenizer, encoder_uses_mask):
    text_encoder = tiny_clip(tokenizer.vocab_size)
    # CLIP configs have no `use_attention_mask`; diffusers passes the mask only to encoders whose config sets it.
    text_encoder.config.use_attention_mask = encoder_uses_mask
    sd_tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), model_max_length=8)
    stable_diffusion = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=sd_tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    prompts = ["a red circle", ""]
    expected, _ = stable_diffusion.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    hidden_states, mask = encode_prompt(prompts, sd_tokenizer, text_encoder, use_attention_mask=False)
    torch.testing.assert_close(hidden_states.detach(), expected)
    assert torch.equal(mask, torch.ones((2, 8), dtype=torch.long))
    masked, _ = encode_prompt(prompts, sd_tokenizer, text_encoder)
    # the mask reached the encoder exactly when its config asks for it
    assert encoder_uses_mask == torch.allclose(masked, hidden_states)
