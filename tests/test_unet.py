"""Tests of `ConditionalUNet`, with diffusers' `UNet2DConditionModel` as the oracle where one exists."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from latentddpm.models import ConditionalUNet, ConditionalUNetOutput, to_unet2d_condition_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "unet"
TINY = {
    "block_out_channels": (32, 64),
    "attention_levels": (True, True),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}
SEQ_LEN = 6


def make_unet(**overrides) -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(**{**TINY, **overrides})


def make_inputs(unet: ConditionalUNet, batch: int = 2, size: tuple[int, int] = (8, 8), seed: int = 0) -> dict:
    """Keyword arguments for `unet(**inputs)`, with the conditioning the config asks for."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, *size, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, SEQ_LEN, config.cross_attention_dim, generator=generator),
    }
    if config.num_class_embeds is not None:
        inputs["class_labels"] = torch.randint(0, config.num_class_embeds, (batch,), generator=generator)
    if config.pooled_projection_dim is not None:
        pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
        inputs["added_cond_kwargs"] = {"text_embeds": pooled}
    return inputs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_levels": (False, False), "mid_block_attention": False},
        {"attention_levels": (False, True), "resnet_time_scale_shift": "scale_shift"},
        {"num_class_embeds": 10, "pooled_projection_dim": 12},
        {"out_channels": 8},
        {"block_out_channels": (32, 32, 64), "attention_levels": (True, False, True), "attention_head_dim": 8},
    ],
)
@pytest.mark.parametrize("size", [(8, 8), (9, 9), (13, 7)])
def test_output_shape_matches_input(overrides, size):
    unet = make_unet(**overrides)
    with torch.no_grad():
        output = unet(**make_inputs(unet, size=size))
    assert isinstance(output, ConditionalUNetOutput)
    assert output.sample.shape == (2, unet.config.out_channels, *size)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_levels": (False, True), "mid_block_attention": False, "transformer_layers_per_block": (1, 2)},
        {"resnet_time_scale_shift": "scale_shift", "num_class_embeds": 10, "out_channels": 8},
    ],
)
def test_matches_unet2d_condition_model_with_the_same_weights(overrides):
    unet = make_unet(**overrides).eval()
    twin = UNet2DConditionModel(**to_unet2d_condition_config(unet.config)).eval()
    twin.load_state_dict(unet.state_dict())  # strict: the state dicts have the same keys and shapes
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in twin.parameters())
    for size in [(8, 8), (9, 7)]:
        inputs = make_inputs(unet, size=size)
        inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs).sample, twin(**inputs).sample, atol=1e-5, rtol=1e-5)


def test_timestep_as_int_0d_or_1d_tensor_gives_the_same_output():
    unet = make_unet().eval()
    inputs = make_inputs(unet, batch=3)
    outputs = []
    with torch.no_grad():
        for timestep in [417, torch.tensor(417), torch.tensor([417]), torch.full((3,), 417)]:
            outputs.append(unet(**{**inputs, "timestep": timestep}).sample)
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=0, rtol=0)


def test_diffusers_style_call_returns_a_tuple():
    unet = make_unet()
    inputs = make_inputs(unet)
    mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    with torch.no_grad():
        prediction = unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
    assert prediction.shape == inputs["sample"].shape


def test_save_and_load_round_trip(tmp_path):
    unet = make_unet(num_class_embeds=10, resnet_time_scale_shift="scale_shift").eval()
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ConditionalUNet.from_pretrained(tmp_path).eval()
    saved_config = json.loads(loaded.to_json_string())
    del saved_config["_name_or_path"]
    assert saved_config == json.loads(unet.to_json_string())
    inputs = make_inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, unet(**inputs).sample, atol=0, rtol=0)


def test_config_files_load_and_match_unet2d_condition_model_sizes():
    sizes = {}
    for name in ["tiny", "small", "base"]:
        config = ConditionalUNet.load_config(CONFIG_DIR / f"{name}.json")
        # The meta device builds the ~860M-parameter base model without allocating it.
        with torch.device("meta"):
            unet = ConditionalUNet.from_config(config)
            twin = UNet2DConditionModel(**to_unet2d_condition_config(unet.config))
        sizes[name] = sum(p.numel() for p in unet.parameters())
        assert sizes[name] == sum(p.numel() for p in twin.parameters())
    assert sizes["tiny"] < 1_000_000
    assert 5_000_000 < sizes["small"] < 15_000_000
    # Stable Diffusion 1.x: diffusers' default UNet2DConditionModel with 768-wide text states.
    with torch.device("meta"):
        sd1 = UNet2DConditionModel(cross_attention_dim=768)
    assert sizes["base"] == sum(p.numel() for p in sd1.parameters())


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    unet = make_unet(attention_levels=(False, True)).train()
    inputs = make_inputs(unet)

    def outputs_and_grads():
        unet.zero_grad(set_to_none=True)
        output = unet(**inputs).sample
        output.square().mean().backward()
        return output.detach(), {name: p.grad.clone() for name, p in unet.named_parameters()}

    output, grads = outputs_and_grads()
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    checkpointed_output, checkpointed_grads = outputs_and_grads()
    torch.testing.assert_close(checkpointed_output, output, atol=0, rtol=0)
    torch.testing.assert_close(checkpointed_grads, grads, atol=1e-6, rtol=1e-5)


def test_sdpa_classic_and_sliced_attention_agree():
    unet = make_unet().eval()
    inputs = make_inputs(unet)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    with torch.no_grad():
        sdpa = unet(**inputs).sample
        unet.set_default_attn_processor()
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
        classic = unet(**inputs).sample
        unet.set_attention_slice("max")
        assert {type(p) for p in unet.attn_processors.values()} == {SlicedAttnProcessor}
        sliced = unet(**inputs).sample
        unet.set_attention_slice(None)
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    torch.testing.assert_close(classic, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliced, sdpa, atol=1e-5, rtol=1e-5)


def test_set_attn_processor_reaches_every_attention_layer():
    unet = make_unet()
    processors = unet.attn_processors
    # Per level: 1 down + 2 up transformers, plus 1 in the middle; 2 attention layers (self, cross) each.
    assert len(processors) == 2 * (2 * 3 + 1)
    unet.set_attn_processor({name: AttnProcessor() for name in processors})
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}


def test_encoder_attention_mask_hides_discarded_tokens():
    unet = make_unet().eval()
    inputs = make_inputs(unet)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    states = inputs["encoder_hidden_states"]
    changed_discarded, changed_kept = states.clone(), states.clone()
    changed_discarded[0, 4:] += 5.0
    changed_discarded[1, 3:] -= 5.0
    changed_kept[:, 0] += 5.0
    with torch.no_grad():
        output = unet(**inputs).sample
        output_discarded = unet(**{**inputs, "encoder_hidden_states": changed_discarded}).sample
        output_kept = unet(**{**inputs, "encoder_hidden_states": changed_kept}).sample
    torch.testing.assert_close(output_discarded, output, atol=1e-6, rtol=0)
    assert (output_kept - output).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    unet = make_unet(dropout=0.5)
    inputs = make_inputs(unet)
    with torch.no_grad():
        unet.eval()
        torch.testing.assert_close(unet(**inputs).sample, unet(**inputs).sample, atol=0, rtol=0)
        unet.train()
        assert not torch.equal(unet(**inputs).sample, unet(**inputs).sample)


@pytest.mark.parametrize(
    ("overrides", "call_overrides", "match"),
    [
        ({"num_class_embeds": 10}, {"class_labels": None}, "class_labels"),
        ({}, {"class_labels": torch.tensor([0, 1])}, "class_labels"),
        ({"pooled_projection_dim": 12}, {"added_cond_kwargs": None}, "text_embeds"),
        ({}, {"timestep": torch.tensor([1, 2, 3])}, "timestep"),
    ],
)
def test_missing_or_unexpected_conditioning_raises(overrides, call_overrides, match):
    unet = make_unet(**overrides)
    with pytest.raises(ValueError, match=match):
        unet(**{**make_inputs(unet), **call_overrides})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"resnet_time_scale_shift": "film"}, "resnet_time_scale_shift"),
        ({"attention_levels": (True,)}, "attention_levels"),
        ({"attention_head_dim": (16, 16, 16)}, "attention_head_dim"),
        ({"block_out_channels": (32, 60)}, "block_out_channels"),
        ({"act_fn": "tanh"}, "tanh"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_unet(**overrides)


def test_no_split_modules_name_classes_of_the_model():
    class_names = {type(module).__name__ for module in make_unet().modules()}
    assert set(ConditionalUNet._no_split_modules) <= class_names


def test_learns_to_denoise_a_fixed_batch():
    unet = make_unet(attention_levels=(False, True)).train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    text = torch.randn(4, SEQ_LEN, 32, generator=generator)
    timesteps = torch.tensor([10, 250, 500, 900])
    # Linear beta schedule of Ho et al. 2020; q(x_t | x_0), eq. (4).
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)[timesteps].float().view(-1, 1, 1, 1)
    noisy = alphas_cumprod.sqrt() * latents + (1 - alphas_cumprod).sqrt() * noise
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(unet(noisy, timesteps, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_torch_compile_fullgraph_matches_eager():
    unet = make_unet(attention_levels=(False, True))
    inputs = make_inputs(unet)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])

    def output_and_grads(model):
        unet.zero_grad(set_to_none=True)
        output = model(**inputs).sample
        output.square().mean().backward()
        return output.detach(), {name: p.grad.clone() for name, p in unet.named_parameters()}

    expected = output_and_grads(unet)
    # aot_eager traces forward and backward like inductor does, without inductor's minutes of C++ compilation.
    compiled = output_and_grads(torch.compile(unet, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=1e-5)
