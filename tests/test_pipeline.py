"""LatentDDPMPipeline on tiny random components: our ConditionalUNet (configs/unet/tiny.json) and DDPMNoiseScheduler,
a tiny AutoencoderKL (factor 2: 16x16 images, 8x8 latents) and a tiny BERT with the real all-MiniLM-L6-v2 tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils import make_image_grid
from transformers import AutoTokenizer, BertConfig, BertModel

import latentddpm.pipelines.pipeline_latent_ddpm as pipeline_module
from latentddpm.cli import main
from latentddpm.latents import decode_latents, encode_images
from latentddpm.models import ConditionalUNet, to_unet2d_condition_config
from latentddpm.pipelines import LatentDDPMPipeline, LatentDDPMPipelineOutput, prepare_hub_folder
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.text import default_text_encoder_path, encode_prompt

UNET_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "unet" / "tiny.json"
PROMPTS = ["a red circle", "a blue square above a green triangle"]
STEPS = 3


def make_pipe(learned_variance: bool = False) -> LatentDDPMPipeline:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    tokenizer.model_max_length = 12  # saved with the pipeline; the real 512 would only slow the tests down
    text_encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=tokenizer.model_max_length,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()
    unet_config = ConditionalUNet.load_config(UNET_CONFIG)  # 8x8 latents, cross-attention 32
    unet = ConditionalUNet.from_config(unet_config, out_channels=8 if learned_variance else 4).eval()
    scheduler = DDPMNoiseScheduler(variance_type="learned_range" if learned_variance else "fixed_small")
    pipe = LatentDDPMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> LatentDDPMPipeline:
    return make_pipe()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda images: all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in images)),
        ("np", lambda images: isinstance(images, np.ndarray) and images.shape == (2, 16, 16, 3)),
        ("pt", lambda images: isinstance(images, torch.Tensor) and images.shape == (2, 3, 16, 16)),
        ("latent", lambda images: isinstance(images, torch.Tensor) and images.shape == (2, 4, 8, 8)),
    ],
)
def test_output_type_gives_shape_and_type(pipe, output_type, check):
    output = pipe(PROMPTS, num_inference_steps=2, generator=seeded(), output_type=output_type)
    assert isinstance(output, LatentDDPMPipelineOutput)
    assert len(output.images) == 2 and check(output.images)
    if output_type in ("np", "pt"):
        assert 0 <= output.images.min() and output.images.max() <= 1
    (images,) = pipe(PROMPTS, num_inference_steps=2, generator=seeded(), output_type=output_type, return_dict=False)
    assert len(images) == 2


def test_same_seed_gives_same_images_and_other_seed_other_images(pipe):
    first = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    again = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    other = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(1), output_type="pt").images
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("learned_variance, guidance_rescale", [(False, 0.0), (False, 0.7), (True, 0.0)])
def test_batched_cfg_matches_separate_conditional_and_unconditional_passes(learned_variance, guidance_rescale):
    pipe = make_pipe(learned_variance)
    guidance_scale = 4.0
    latents = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        generator=seeded(),
        output_type="latent",
    ).images

    # Reference: two U-Net calls per step, the unconditional one on the empty prompt's encoding.
    cond, cond_mask = encode_prompt(PROMPTS, pipe.tokenizer, pipe.text_encoder)
    uncond, uncond_mask = encode_prompt([""] * len(PROMPTS), pipe.tokenizer, pipe.text_encoder)
    scheduler = DDPMNoiseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    generator = seeded()
    reference = torch.randn((2, 4, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_cond = pipe.unet(reference, t, cond, encoder_attention_mask=cond_mask).sample
            out_uncond = pipe.unet(reference, t, uncond, encoder_attention_mask=uncond_mask).sample
            eps_cond, variance = out_cond[:, :4], out_cond[:, 4:]  # variance is empty without a learned variance
            guided = out_uncond[:, :4] + guidance_scale * (eps_cond - out_uncond[:, :4])
            if guidance_rescale:
                guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale)
            model_output = torch.cat([guided, variance], dim=1)
            reference = scheduler.step(model_output, t, reference, generator=generator).prev_sample
    # float32 sums in a batch of 4 vs 2; guidance multiplies their difference by the scale
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guidance_scale, unet_batch", [(1.0, 2), (0.5, 2), (3.0, 4)])
def test_unet_is_called_once_per_step_with_the_cfg_doubled_batch_only_when_guiding(pipe, guidance_scale, unet_batch):
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="latent")
    finally:
        hook.remove()
    assert batches == [unet_batch] * STEPS


def test_diffusers_unet2d_condition_model_is_a_drop_in_for_our_unet(pipe):
    theirs = UNet2DConditionModel(**to_unet2d_condition_config(pipe.unet.config)).eval()
    theirs.load_state_dict(pipe.unet.state_dict())
    with_theirs = LatentDDPMPipeline(**{**pipe.components, "unet": theirs})
    with_theirs.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    actual = with_theirs(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_num_images_per_prompt_groups_the_images_of_each_prompt(pipe):
    pipe = LatentDDPMPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((6, 4, 8, 8), generator=seeded())
    images = pipe(PROMPTS, num_images_per_prompt=3, num_inference_steps=STEPS, latents=noise, output_type="pt").images
    assert images.shape == (6, 3, 16, 16)
    second_prompt = pipe(
        PROMPTS[1], num_images_per_prompt=3, num_inference_steps=STEPS, latents=noise[3:], output_type="pt"
    ).images
    torch.testing.assert_close(images[3:], second_prompt, atol=1e-5, rtol=1e-5)


def test_prompt_embeds_give_the_same_images_as_prompts(pipe):
    from_prompts = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    embeds, mask = encode_prompt(PROMPTS, pipe.tokenizer, pipe.text_encoder)
    negative, negative_mask = encode_prompt(["", ""], pipe.tokenizer, pipe.text_encoder)
    from_embeds = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="pt",
    ).images
    torch.testing.assert_close(from_embeds, from_prompts)


@pytest.mark.parametrize("missing", ["prompt", "negative_prompt"])
def test_embeds_without_their_mask_are_refused_when_the_model_was_trained_with_masks(pipe, missing):
    embeds, mask = encode_prompt(PROMPTS, pipe.tokenizer, pipe.text_encoder)
    masks = {"prompt_attention_mask": mask, "negative_prompt_attention_mask": mask}
    del masks[f"{missing}_attention_mask"]
    with pytest.raises(ValueError, match=f"`{missing}_embeds` need their `{missing}_attention_mask`.*masked padding"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=1, output_type="latent", **masks)


def test_without_attention_mask_the_unet_attends_to_padding_and_embeds_need_no_mask(pipe):
    unmasked = LatentDDPMPipeline(**pipe.components, use_attention_mask=False)
    unmasked.set_progress_bar_config(disable=True)
    masks = []
    hook = unmasked.unet.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["encoder_attention_mask"]), with_kwargs=True
    )
    try:
        from_prompts = unmasked(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    finally:
        hook.remove()
    assert masks == [None] * STEPS
    # Stable Diffusion's convention: the encoder and the U-Net see the padding (BERT's config has no mask flag).
    ids = pipe.tokenizer(PROMPTS + ["", ""], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids).last_hidden_state
    from_embeds = unmasked(
        prompt_embeds=embeds[:2],
        negative_prompt_embeds=embeds[2:],
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="pt",
    ).images
    torch.testing.assert_close(from_embeds, from_prompts)
    masked = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    assert not torch.allclose(masked, from_prompts)


def test_use_attention_mask_round_trips_and_old_folders_load_it_as_true(pipe, tmp_path):
    LatentDDPMPipeline(**pipe.components, use_attention_mask=False).save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["use_attention_mask"] is False
    assert LatentDDPMPipeline.from_pretrained(tmp_path).config.use_attention_mask is False

    del model_index["use_attention_mask"]  # a folder saved before the key existed
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))
    assert LatentDDPMPipeline.from_pretrained(tmp_path).config.use_attention_mask is True


def test_negative_prompt_changes_the_images(pipe):
    plain = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    negative = pipe(
        PROMPTS, negative_prompt="blurry", num_inference_steps=STEPS, generator=seeded(), output_type="pt"
    ).images
    assert not torch.allclose(plain, negative)


def test_callback_sees_every_step_and_may_replace_latents(pipe):
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append((i, int(t), sorted(callback_kwargs), callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if i == STEPS - 1 else {}

    latents = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images
    timesteps = pipe.scheduler.timesteps.tolist()
    assert seen == [(i, timesteps[i], ["latents", "prompt_embeds"], (2, 4, 8, 8)) for i in range(STEPS)]
    assert torch.equal(latents, torch.zeros_like(latents))


def test_save_pretrained_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["unet"] == ["latentddpm.models.unet_conditional", "ConditionalUNet"]
    assert model_index["scheduler"] == ["latentddpm.schedulers.scheduling_ddpm_noise", "DDPMNoiseScheduler"]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin"))

    loaded = LatentDDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, ConditionalUNet) and isinstance(loaded.scheduler, DDPMNoiseScheduler)
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    actual = loaded(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    assert torch.equal(actual, expected)


def test_from_pretrained_in_a_fresh_offline_process_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    script = (
        "import sys, torch\n"
        "from latentddpm import LatentDDPMPipeline\n"
        "pipe = LatentDDPMPipeline.from_pretrained(sys.argv[1])\n"
        f"images = pipe({PROMPTS!r}, num_inference_steps={STEPS}, generator=torch.Generator().manual_seed(0),"
        " output_type='np').images\n"
        "__import__('numpy').save(sys.argv[2], images)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, tmp_path / "pipe", tmp_path / "images.npy"], env=env, check=True)
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swapped_diffusers_scheduler_samples(scheduler_class):
    pipe = make_pipe()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    again = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    assert first.shape == (2, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    "scheduler_class, overrides",
    # diffusers' DPM-Solver keeps 3 channels of a learned-variance output (pixel-space IF); variance_type=None
    [(DDIMScheduler, {}), (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "variance_type": None})],
    ids=["ddim", "dpmsolver++"],
)
def test_swapped_scheduler_gets_only_the_prediction_channels_of_a_learned_variance_unet(scheduler_class, overrides):
    learned, fixed = make_pipe(learned_variance=True), make_pipe()
    # the fixed-variance U-Net is the learned one without its variance outputs
    state = learned.unet.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:4], state["conv_out.bias"][:4]
    fixed.unet.load_state_dict(state)
    for pipe in (learned, fixed):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
    expected = fixed(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    actual = learned(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    torch.testing.assert_close(actual, expected)


def test_eta_reaches_ddim(pipe):
    ddim = LatentDDPMPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    ddim.set_progress_bar_config(disable=True)
    noise = torch.randn((2, 4, 8, 8), generator=seeded())

    def run(eta: float, seed: int) -> torch.Tensor:
        kwargs = {"num_inference_steps": STEPS, "latents": noise, "output_type": "latent"}
        return ddim(PROMPTS, eta=eta, generator=seeded(seed), **kwargs).images

    assert torch.equal(run(0.0, 0), run(0.0, 1))  # eta = 0: deterministic DDIM
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))  # eta = 1: fresh noise at every step


def test_custom_timesteps_are_used(pipe):
    seen = []
    pipe(
        PROMPTS,
        timesteps=[900, 500, 100],
        output_type="latent",
        callback_on_step_end=lambda pipeline, i, t, kwargs: seen.append(int(t)) or {},
    )
    assert seen == [900, 500, 100]


def random_image() -> torch.Tensor:
    return torch.rand((1, 3, 16, 16), generator=seeded(2))


def vae_round_trip(vae: AutoencoderKL, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decode_latents(vae, encode_images(vae, image * 2 - 1, sample_posterior=False)) / 2 + 0.5


def test_img2img_with_strength_zero_returns_the_vae_round_trip_of_the_image(pipe):
    image = random_image()
    output = pipe(PROMPTS[0], image=image, strength=0.0, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(output, vae_round_trip(pipe.vae, image))


def test_img2img_runs_the_last_strength_fraction_of_the_schedule(pipe):
    seen = []
    pipe(
        PROMPTS[0],
        image=random_image(),
        strength=0.5,
        num_inference_steps=4,
        output_type="latent",
        callback_on_step_end=lambda pipeline, i, t, kwargs: seen.append(int(t)) or {},
    )
    assert seen == pipe.scheduler.timesteps[2:].tolist()


def test_inpainting_keeps_the_known_region_of_the_encoded_image(pipe):
    image = random_image()
    mask = torch.zeros((1, 1, 16, 16))
    mask[..., :, :8] = 1  # repaint the left half
    latents = pipe(
        PROMPTS[0], image=image, mask_image=mask, strength=1.0, num_inference_steps=STEPS, output_type="latent"
    ).images
    with torch.no_grad():
        image_latents = encode_images(pipe.vae, image * 2 - 1, sample_posterior=False)
    torch.testing.assert_close(latents[..., 4:], image_latents[..., 4:], atol=0, rtol=0)
    assert not torch.allclose(latents[..., :4], image_latents[..., :4], atol=0.1)

    # With nothing to repaint the output is the image after a VAE round trip.
    kept = pipe(PROMPTS[0], image=image, mask_image=torch.zeros((1, 1, 16, 16)), output_type="pt").images
    torch.testing.assert_close(kept, vae_round_trip(pipe.vae, image))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": PROMPTS, "negative_prompt": ["one"]}, "`negative_prompt` has 1 prompts but `prompt` has 2"),
        ({"prompt": PROMPTS, "latents": torch.zeros(1, 4, 8, 8)}, r"`latents` have to be of shape \(2, 4, 8, 8\)"),
        ({"prompt": "x", "height": 15}, "divisible by the VAE scale factor 2"),
        ({"prompt": "x", "image": torch.zeros(1, 3, 16, 16), "strength": 1.5}, r"`strength` .* but is 1.5"),
        ({"prompt": "x", "output_type": "jpg"}, "`output_type` has to be one of .* but is 'jpg'"),
        ({"prompt": "x", "mask_image": torch.zeros(1, 1, 16, 16)}, "`mask_image` needs the `image`"),
        ({"prompt": "x", "callback_on_step_end_tensor_inputs": ["noise"]}, r"\['noise'\]"),
        ({"prompt": "x", "prompt_embeds": torch.zeros(1, 12, 32)}, "exactly one of `prompt` and `prompt_embeds`"),
        ({"prompt": PROMPTS, "image": torch.zeros(3, 3, 16, 16)}, "need 1 or 2 .* but have 3"),
    ],
)
def test_bad_input_raises_value_error_naming_it(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=1, output_type=kwargs.pop("output_type", "latent"), **kwargs)


def test_memory_savers_keep_the_images(pipe):
    pipe = make_pipe()
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    pipe.enable_attention_slicing("max")
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    actual = pipe(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload_gives_the_images_of_the_pipeline_on_the_accelerator():
    on_gpu = make_pipe().to("cuda")
    expected = on_gpu(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    offloaded = make_pipe()
    offloaded.enable_model_cpu_offload()
    actual = offloaded(PROMPTS, num_inference_steps=STEPS, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(actual, expected)
    assert offloaded.unet.device.type == "cpu"


def front_matter(readme: Path) -> dict:
    _, metadata, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(metadata)


def test_hub_folder_holds_safetensors_pipeline_card_and_grid(pipe, tmp_path):
    grid = PIL.Image.new("RGB", (32, 16), "red")
    training_config = {"learning_rate": 1e-4, "resolution": 16, "text_encoder": "all-MiniLM-L6-v2"}
    prepare_hub_folder(
        pipe,
        tmp_path,
        repo_id="user/tiny-ldm",
        base_model="user/base",
        dataset="user/shapes",
        sample_grid=grid,
        training_config=training_config,
    )
    assert (tmp_path / "model_index.json").is_file() and not list(tmp_path.rglob("*.bin"))
    metadata = front_matter(tmp_path / "README.md")
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    assert metadata["tags"] == ["latentddpm", "text-to-image", "diffusion"]
    assert metadata["base_model"] == "user/base" and metadata["datasets"] == ["user/shapes"]
    readme = (tmp_path / "README.md").read_text()
    assert "![samples](sample_grid.png)" in readme and 'from_pretrained("user/tiny-ldm")' in readme
    assert yaml.safe_load(readme.split("```yaml\n")[1].split("```")[0]) == training_config
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "sample_grid.png")), np.asarray(grid))


def test_push_to_hub_uploads_the_prepared_folder(pipe, monkeypatch):
    uploads = []

    class Repo:
        repo_id = "user/tiny-ldm"

    class Commit:
        commit_url = "https://huggingface.co/user/tiny-ldm/commit/0"

    def upload_folder(*, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append((repo_id, files, front_matter(Path(folder_path) / "README.md")))
        return Commit()

    # The network boundary only: creating the repository and uploading.
    monkeypatch.setattr(pipeline_module, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(pipeline_module, "upload_folder", upload_folder)
    url = pipe.push_to_hub("user/tiny-ldm", dataset="user/shapes", sample_grid=PIL.Image.new("RGB", (16, 16)))

    assert url == Commit.commit_url
    [(repo_id, files, metadata)] = uploads
    assert repo_id == "user/tiny-ldm" and metadata["datasets"] == ["user/shapes"]
    assert {"README.md", "sample_grid.png", "model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(
        files
    )


def test_cli_sample_writes_the_grid_of_the_pipeline_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    argv = ["--model", str(tmp_path / "pipe"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "2"]
    main(["sample", *argv, "--steps", "2", "--guidance", "2", "--seed", "3", "--scheduler", "ddim", "--out", str(out)])

    ddim = LatentDDPMPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    images = ddim(
        PROMPTS, num_inference_steps=2, guidance_scale=2, num_images_per_prompt=2, generator=seeded(3)
    ).images
    expected = make_image_grid(images, rows=2, cols=2)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
