"""`ConditionalUNet` as a diffusers citizen: `UNet2DConditionModel.forward`'s full signature, its config vocabulary
and diffusers' loaders, each checked against the twin `UNet2DConditionModel` with the same weights."""

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from latentddpm.models import ConditionalUNet, to_unet2d_condition_config

# The Stable Diffusion layout in miniature: attention everywhere but the last level, which does not downsample.
TINY = {
    "block_out_channels": (32, 64),
    "attention_levels": (True, False),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}
SEQ_LEN = 6


def make_twins(**overrides) -> tuple[ConditionalUNet, UNet2DConditionModel]:
    torch.manual_seed(0)
    ours = ConditionalUNet(**{**TINY, **overrides}).eval()
    # random, not zero-initialised, output weights so that every path shows in the output
    for parameter in ours.parameters():
        parameter.data.normal_(0, 0.1)
    twin = UNet2DConditionModel(**to_unet2d_condition_config(ours.config)).eval()
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def make_inputs(unet: ConditionalUNet, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, unet.config.in_channels, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(batch, SEQ_LEN, unet.config.cross_attention_dim, generator=generator),
    }


def assert_same_outputs(ours: ConditionalUNet, twin: UNet2DConditionModel, **inputs):
    with torch.no_grad():
        expected = twin(**inputs).sample
        actual = ours(**inputs).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_forward_signature_is_unet2d_condition_models():
    ours = inspect.signature(ConditionalUNet.forward).parameters
    theirs = inspect.signature(UNet2DConditionModel.forward).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_attention_processors_are_listed_in_diffusers_order():
    # IP-Adapter checkpoints number their cross-attention weights in this order.
    ours, twin = make_twins(attention_levels=(True, True))
    assert list(ours.attn_processors) == list(twin.attn_processors)


def test_timestep_cond_matches_the_twin_and_changes_the_output():
    ours, twin = make_twins(time_cond_proj_dim=16)
    inputs = make_inputs(ours)
    timestep_cond = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    assert_same_outputs(ours, twin, **inputs, timestep_cond=timestep_cond)
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs, timestep_cond=timestep_cond).sample, ours(**inputs).sample)


def test_self_attention_mask_matches_the_twin():
    # One attention level (8x8 = 64 tokens), so that one mask fits every self-attention layer.
    ours, twin = make_twins(mid_block_attention=False)
    attention_mask = torch.ones(2, 64)
    attention_mask[0, 20:] = 0
    assert_same_outputs(ours, twin, **make_inputs(ours), attention_mask=attention_mask)


def test_controlnet_residuals_match_the_twin():
    ours, twin = make_twins()
    inputs = make_inputs(ours)
    generator = torch.Generator().manual_seed(2)
    # the shapes of the encoder's skip connections: conv_in, level 0 (ResNet, downsampling), level 1 (ResNet)
    skip_shapes = [(2, 32, 8, 8)] * 2 + [(2, 32, 4, 4), (2, 64, 4, 4)]
    down = tuple(torch.randn(shape, generator=generator) for shape in skip_shapes)
    mid = torch.randn(2, 64, 4, 4, generator=generator)
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    assert_same_outputs(ours, twin, **inputs, **residuals)
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs, **residuals).sample, ours(**inputs).sample)


def test_t2i_adapter_residuals_match_the_twin_and_are_not_consumed():
    ours, twin = make_twins(attention_levels=(True, True))
    inputs = make_inputs(ours)
    generator = torch.Generator().manual_seed(3)
    # one feature per level, and one of the middle block's shape (T2I-Adapter-XL)
    features = [torch.randn(shape, generator=generator) for shape in [(2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 4, 4)]]
    with torch.no_grad():
        actual = ours(**inputs, down_intrablock_additional_residuals=features).sample
        expected = twin(**inputs, down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert len(features) == 3


def test_controlnet_residuals_without_the_middle_one_are_refused():
    ours, _ = make_twins()
    with pytest.raises(ValueError, match="`down_block_additional_residuals` .* need `mid_block_additional_residual`"):
        ours(**make_inputs(ours), down_block_additional_residuals=(torch.zeros(2, 32, 8, 8),))


def test_cross_attention_kwargs_reach_every_attention_processor():
    class RecordingProcessor(AttnProcessor2_0):
        def __init__(self, seen: list):
            super().__init__()
            self.seen = seen

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, tag=None):
            self.seen.append(tag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    ours, _ = make_twins()
    seen = []
    ours.set_attn_processor(RecordingProcessor(seen))
    with torch.no_grad():
        ours(**make_inputs(ours), cross_attention_kwargs={"tag": "hello"})
    assert seen == ["hello"] * len(ours.attn_processors)


def test_freeu_matches_the_twin():
    ours, twin = make_twins(attention_levels=(True, True))
    inputs = make_inputs(ours)
    with torch.no_grad():
        plain = ours(**inputs).sample
    for unet in (ours, twin):
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert_same_outputs(ours, twin, **inputs)
    ours.disable_freeu()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).sample, plain)


def test_fused_qkv_projections_keep_the_output():
    ours, _ = make_twins()
    inputs = make_inputs(ours)
    with torch.no_grad():
        expected = ours(**inputs).sample
        ours.fuse_qkv_projections()
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in ours.attn_processors.values())
        torch.testing.assert_close(ours(**inputs).sample, expected, atol=1e-5, rtol=1e-5)
        ours.unfuse_qkv_projections()
        torch.testing.assert_close(ours(**inputs).sample, expected, atol=0, rtol=0)


def ip_adapter_state_dict(unet: ConditionalUNet, image_embed_dim: int = 24) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter (Ye et al. 2023) in its checkpoint layout: an image projection to 4 tokens and key/value
    projections for every cross-attention layer, numbered 1, 3, 5, ... in `attn_processors` order."""
    generator = torch.Generator().manual_seed(4)
    cross_dim = unet.config.cross_attention_dim
    state_dict = {
        "image_proj": {
            "proj.weight": torch.randn(4 * cross_dim, image_embed_dim, generator=generator) * 0.1,
            "proj.bias": torch.randn(4 * cross_dim, generator=generator) * 0.1,
            "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim),
        },
        "ip_adapter": {},
    }
    names = [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")]
    for i, name in enumerate(names):
        width = unet.get_submodule(name).to_q.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(width, cross_dim, generator=generator) * 0.1
            state_dict["ip_adapter"][f"{2 * i + 1}.{projection}.weight"] = weight
    return state_dict


def test_ip_adapter_weights_load_and_match_the_twin():
    ours, twin = make_twins(attention_levels=(True, True))
    inputs = make_inputs(ours)
    with torch.no_grad():
        plain = ours(**inputs).sample
    state_dict = ip_adapter_state_dict(ours)
    for unet in (ours, twin):
        unet._load_ip_adapter_weights([state_dict])
    image_embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(5))]
    assert_same_outputs(ours, twin, **inputs, added_cond_kwargs={"image_embeds": image_embeds})
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs, added_cond_kwargs={"image_embeds": image_embeds}).sample, plain)
    with pytest.raises(ValueError, match="`added_cond_kwargs=\\{'image_embeds': ...\\}` must be passed exactly"):
        ours(**inputs)


def test_lora_adapter_scale_reaches_the_lora_layers():
    peft = pytest.importorskip("peft")
    ours, _ = make_twins()
    inputs = make_inputs(ours)
    with torch.no_grad():
        plain = ours(**inputs).sample
    config = peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    ours.add_adapter(config)
    with torch.no_grad():
        off = ours(**inputs, cross_attention_kwargs={"scale": 0.0}).sample
        on = ours(**inputs, cross_attention_kwargs={"scale": 1.0}).sample
        default = ours(**inputs).sample
    torch.testing.assert_close(off, plain)
    assert not torch.allclose(on, plain)
    torch.testing.assert_close(default, on)


def test_weighted_adapters_give_the_twins_outputs_and_switch_off_bitwise():
    # Oracle: diffusers' own peft integration on the twin UNet2DConditionModel, with the same adapter weights.
    peft = pytest.importorskip("peft")
    ours, twin = make_twins()
    inputs = make_inputs(ours)
    with torch.no_grad():
        plain = ours(**inputs).sample
    config = peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    for name in ("a", "b"):
        ours.add_adapter(config, adapter_name=name)
        twin.add_adapter(config, adapter_name=name)
        weights = peft.get_peft_model_state_dict(ours, adapter_name=name)
        assert not peft.set_peft_model_state_dict(twin, weights, adapter_name=name).unexpected_keys
    for unet in (ours, twin):
        unet.set_adapters(["a", "b"], weights=[0.7, -0.4])
    assert_same_outputs(ours, twin, **inputs)
    with torch.no_grad():
        mixed = ours(**inputs).sample
        assert not torch.allclose(mixed, plain, atol=1e-3)
        ours.disable_adapters()
        torch.testing.assert_close(ours(**inputs).sample, plain, atol=0, rtol=0)
        ours.enable_adapters()
        torch.testing.assert_close(ours(**inputs).sample, mixed, atol=0, rtol=0)
    assert ours.active_adapters() == ["a", "b"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cross_attention_dim": (32, 64)}, r"`cross_attention_dim`=\(32, 64\) must be an int"),
        ({"layers_per_block": (1, 2)}, r"`layers_per_block`=\(1, 2\) must be an int"),
        ({"time_cond_proj_dim": 16.0}, "`time_cond_proj_dim`=16.0 must be an int or None"),
    ],
)
def test_config_values_the_architecture_cannot_honour_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        ConditionalUNet(**{**TINY, **overrides})


def test_timestep_cond_without_time_cond_proj_dim_is_refused():
    ours, _ = make_twins()
    with pytest.raises(ValueError, match="`timestep_cond` needs a model with `time_cond_proj_dim`"):
        ours(**make_inputs(ours), timestep_cond=torch.zeros(2, 16))
