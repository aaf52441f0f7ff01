"""`ConditionalUNet` as the `unet` of diffusers' own pipelines: the images equal those of the twin
`UNet2DConditionModel` with the same weights."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from latentddpm.models import ConditionalUNet, to_unet2d_condition_config
from latentddpm.text import default_text_encoder_path

UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "attention_levels": (True, False),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}
PROMPTS = ["a red circle", "a blue square"]


def components(**unet_overrides) -> tuple[dict, UNet2DConditionModel]:
    """Tiny Stable Diffusion components with our U-Net, and the twin `UNet2DConditionModel`."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), model_max_length=8)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text_encoder = CLIPTextModel(config).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    ).eval()
    unet = ConditionalUNet(**UNET, **unet_overrides).eval()
    for parameter in unet.parameters():  # random output convolutions too, so that every path shows
        parameter.data.normal_(0, 0.1)
    twin = UNet2DConditionModel(**to_unet2d_condition_config(unet.config)).eval()
    twin.load_state_dict(unet.state_dict())
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {**parts, **extras}, twin


def images(pipeline_class, parts: dict, **call) -> np.ndarray:
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_inference_steps=3, generator=generator, output_type="np", **call)[0]


def test_stable_diffusion_pipeline_gives_the_twins_images():
    parts, twin = components()
    parts["scheduler"] = DDIMScheduler()
    ours = images(StableDiffusionPipeline, parts, guidance_scale=3.0)
    theirs = images(StableDiffusionPipeline, {**parts, "unet": twin}, guidance_scale=3.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_controlnet_pipeline_gives_the_twins_images():
    parts, twin = components()
    parts["scheduler"] = DDIMScheduler()
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(twin, conditioning_embedding_out_channels=(8, 16)).eval()
    for parameter in controlnet.parameters():  # the zero convolutions too, so that residuals flow
        parameter.data.normal_(0, 0.1)
    control = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    parts["controlnet"] = controlnet
    ours = images(StableDiffusionControlNetPipeline, parts, image=control)
    theirs = images(StableDiffusionControlNetPipeline, {**parts, "unet": twin}, image=control)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    without = images(StableDiffusionControlNetPipeline, parts, image=control, controlnet_conditioning_scale=0.0)
    assert not np.allclose(ours, without, atol=1e-3)


@pytest.mark.parametrize("guidance_scale", [2.0, 6.0])
def test_latent_consistency_pipeline_gives_the_twins_images(guidance_scale):
    parts, twin = components(time_cond_proj_dim=16)
    parts["scheduler"] = LCMScheduler()
    ours = images(LatentConsistencyModelPipeline, parts, guidance_scale=guidance_scale)
    theirs = images(LatentConsistencyModelPipeline, {**parts, "unet": twin}, guidance_scale=guidance_scale)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
