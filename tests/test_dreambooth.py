"""DreamBooth: instance folders, class images that survive a kill, the masked loss, prior preservation in train_ldm."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LDM_CONFIG
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file
from test_pipeline import make_pipe

from latentddpm.batching import PairedStream, ShuffledStream
from latentddpm.cache import LatentCache, build_latent_cache, finish_latent_cache
from latentddpm.config import ConfigError
from latentddpm.data.transforms import ImageTransform
from latentddpm.dreambooth import ClassImageSettings, generate_class_images, read_image_folder, read_prompts
from latentddpm.losses import Objective, diffusion_loss, training_losses
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.training import train_ldm

ORANGE = (255, 140, 0)
SETTINGS = ClassImageSettings(
    prompts=("a red circle", "a blue square"),
    resolution=16,
    num_inference_steps=2,
    guidance_scale=3.0,
    seed=0,
    batch_size=2,
)


def write_star_images(folder: Path, captions: dict[str, str]) -> Path:
    """16 px orange blobs on black, one per corner; `00.png` transparent on its right half; `captions` by stem."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate([(2, 2), (9, 2), (2, 9), (9, 9)]):
        pixels = np.zeros((16, 16, 4), dtype=np.uint8)
        pixels[..., 3] = 255
        pixels[y : y + 5, x : x + 5, :3] = ORANGE
        if i == 0:
            pixels[:, 8:, 3] = 0
        mode = "RGBA" if i == 0 else "RGB"
        Image.fromarray(pixels if i == 0 else pixels[..., :3], mode=mode).save(folder / f"{i:02d}.png")
    for stem, caption in captions.items():
        (folder / f"{stem}.txt").write_text(caption)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def base(pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    pipe.save_pretrained(path)
    return path


def test_instance_captions_come_from_txt_files_else_the_instance_prompt(tmp_path):
    folder = write_star_images(tmp_path / "stars", {"01": "a sks star in the top right\n"})
    (folder / "notes.md").write_text("not an image")
    rows = read_image_folder(folder, "a sks star")
    assert [(path.name, caption) for path, caption in rows] == [
        ("00.png", "a sks star"),
        ("01.png", "a sks star in the top right"),
        ("02.png", "a sks star"),
        ("03.png", "a sks star"),
    ]


def test_class_prompt_is_a_prompt_a_list_or_a_file_of_lines(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    assert read_prompts("a star") == ["a star"]
    assert read_prompts(["a", "b"]) == ["a", "b"]
    assert read_prompts(str(tmp_path / "prompts.txt")) == ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "'instance_data': no such folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "'instance_data': no image"),
        (lambda tmp: write_star_images(tmp / "uncaptioned", {"00": "a sks star"}), "01.png has no caption"),
    ],
)
def test_bad_instance_folder_is_a_one_line_error(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as error:
        read_image_folder(make(tmp_path), None)
    assert "\n" not in str(error.value)


def test_class_generation_killed_mid_group_resumes_with_identical_files(pipe, tmp_path):
    key = SETTINGS.key(pipe)
    straight = tmp_path / "straight"
    generate_class_images(pipe, SETTINGS, key, 5, straight, show_progress=False)

    # A fault on the 8th rename: the record, images 0 and 1 (caption + image each), image 2; image 3's caption fails.
    # Group 1 (images 2, 3) is left half written, with a temporary file.
    killed, replace, calls = tmp_path / "killed", os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 8:
            raise KeyboardInterrupt("killed")
        replace(src, dst)

    patch = pytest.MonkeyPatch()
    patch.setattr(os, "replace", failing_replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_class_images(pipe, SETTINGS, key, 5, killed, show_progress=False)
    finally:
        patch.undo()
    assert sorted(p.name for p in killed.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    generate_class_images(pipe, SETTINGS, key, 5, killed, show_progress=False)

    assert folder_bytes(killed) == folder_bytes(straight)
    assert sorted(folder_bytes(straight)) == sorted(
        ["class_images.json"] + [f"{i:05d}.{ext}" for i in range(5) for ext in ("png", "txt")]
    )
    assert (straight / "00003.txt").read_text() == "a blue square"  # image i: prompt i mod 2


def test_class_images_of_other_settings_are_refused(pipe, tmp_path):
    generate_class_images(pipe, SETTINGS, SETTINGS.key(pipe), 1, tmp_path, show_progress=False)
    other = ClassImageSettings(**{**vars(SETTINGS), "guidance_scale": 1.0})
    with pytest.raises(ConfigError, match="holds class images of another base pipeline or other settings"):
        generate_class_images(pipe, other, other.key(pipe), 1, tmp_path, show_progress=False)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loss_inputs():
    generator = seeded(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    hidden = torch.randn((2, 5, 32), generator=generator)
    return latents, hidden, DDPMNoiseScheduler(prediction_type="v_prediction")


def test_mask_of_ones_gives_the_unmasked_loss(pipe):
    latents, hidden, scheduler = loss_inputs()
    objective = Objective(snr_gamma=5.0, noise_offset=0.1)
    with torch.no_grad():
        plain, _ = training_losses(pipe.unet, scheduler, latents, hidden, None, objective, seeded(1))
        ones = torch.ones((2, 1, 8, 8))
        masked, _ = training_losses(pipe.unet, scheduler, latents, hidden, None, objective, seeded(1), ones)
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=0)


def test_masked_loss_is_the_mean_squared_error_over_the_mask(pipe):
    latents, hidden, scheduler = loss_inputs()
    noise = torch.randn(latents.shape, generator=seeded(2))
    timesteps = torch.tensor([10, 700])
    mask = torch.zeros((2, 1, 8, 8))
    mask[0, :, :3, :5] = 1.0  # a box
    mask[1, :, 4:, :] = 0.5  # a half-weighted band: a weighted mean is still the mean over the band
    empty = torch.zeros_like(mask)
    with torch.no_grad():
        got, _ = diffusion_loss(pipe.unet, scheduler, latents, noise, timesteps, hidden, loss_mask=mask)
        nothing, _ = diffusion_loss(pipe.unet, scheduler, latents, noise, timesteps, hidden, loss_mask=empty)
        prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    error = (prediction - scheduler.get_target(latents, noise, timesteps)) ** 2
    expected = torch.stack([error[0, :, :3, :5].mean(), error[1, :, 4:, :].mean()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert torch.equal(nothing, torch.zeros(2))  # an image transparent everywhere teaches nothing (not NaN)


def test_alpha_channel_becomes_the_latent_loss_mask_of_each_view(pipe, tmp_path):
    folder = write_star_images(tmp_path / "stars", {})
    build_latent_cache(
        Dataset.from_dict({"image": [str(folder / "00.png"), str(folder / "01.png")], "text": ["a", "b"]}),
        tmp_path / "cache",
        image_column="image",
        caption_column="text",
        transform=ImageTransform(16),
        vae=pipe.vae,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        random_flip=True,
        show_progress=False,
        loss_mask=True,
    )
    finish_latent_cache(tmp_path / "cache")
    cache = LatentCache(tmp_path / "cache")
    loss_mask = cache.gather("loss_mask", torch.arange(2)).float()
    left = torch.zeros((1, 8, 8))
    left[..., :4] = 1.0  # the opaque left half of the image, on the factor-2 latent grid
    assert loss_mask.shape == (2, 2, 1, 8, 8)
    assert torch.equal(loss_mask[0, 0], left) and torch.equal(loss_mask[0, 1], left.flip(-1))
    assert torch.equal(loss_mask[1], torch.ones((2, 1, 8, 8)))  # opaque: everywhere
    drawn = cache.draw(torch.tensor([0, 0, 1]), seeded(0))["loss_mask"]
    assert drawn.shape == (3, 1, 8, 8)


def test_prior_preservation_batches_are_instance_rows_then_class_rows():
    stream = PairedStream(ShuffledStream(3, 2, seed=0), ShuffledStream(5, 2, seed=1), offset=3)
    batches = torch.stack([stream.indices(step) for step in range(15)])  # 30 rows of each kind: 10 and 6 epochs
    assert batches.shape == (15, 4) and stream.num_rows == 3 + 5
    assert torch.equal(batches[:, :2].flatten().bincount(), torch.full((3,), 10))
    assert torch.equal(batches[:, 2:].flatten().bincount()[3:], torch.full((5,), 6))


def dreambooth_args(base, tmp_path, instance, *extra):
    return [
        "--config", str(TINY_LDM_CONFIG),
        "--pretrained_pipeline", str(base),
        "--tokenizer_max_length", "12",  # the base's: its text encoder has 12 positions
        "--instance_data", str(instance),
        "--instance_prompt", "a sks star",
        "--num_validation_samples", "0",
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--output_dir", str(tmp_path / "run"),
        "--cache_dir", str(tmp_path / "cache"),
        *extra,
    ]  # fmt: skip


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_and_masked_loss_resumes_bitwise(base, tmp_path):
    instance = write_star_images(tmp_path / "stars", {"00": "a sks star in the top left"})
    (tmp_path / "class_prompts.txt").write_text("a red circle\na blue square\n")
    prior = [
        "--with_prior_preservation", "--class_prompt", str(tmp_path / "class_prompts.txt"), "--num_class_images", "3",
        "--class_inference_steps", "2", "--sample_batch_size", "2", "--masked_loss",
    ]  # fmt: skip
    straight = train_ldm.main(dreambooth_args(base, tmp_path / "a", instance, *prior))
    class_images = sorted((tmp_path / "a" / "cache" / "class_images").glob("*/*.png"))
    assert [path.name for path in class_images] == ["00000.png", "00001.png", "00002.png"]
    (cache_folder,) = [path.parent for path in (tmp_path / "a" / "cache").glob("*/index.json")]
    cache = LatentCache(cache_folder)
    loss_mask = cache.gather("loss_mask", torch.arange(len(cache)))
    assert len(cache) == 4 + 3 and loss_mask.shape == (7, 1, 1, 8, 8)  # instance rows, then class rows
    assert cache.captions == ["a blue square", "a red circle", "a sks star", "a sks star in the top left"]

    checkpointed = train_ldm.main(
        dreambooth_args(base, tmp_path / "b", instance, *prior, "--checkpointing_steps", "2")
    )
    checkpoint = str(checkpointed / "checkpoints" / "checkpoint-2")
    resumed = train_ldm.main(
        dreambooth_args(base, tmp_path / "c", instance, *prior, "--resume_from_checkpoint", checkpoint)
    )
    expected = unet_weights(straight)
    assert not all(torch.equal(v, unet_weights(base)[k]) for k, v in expected.items())  # it trained
    for run in (checkpointed, resumed):
        got = unet_weights(run)
        assert all(torch.equal(got[k], expected[k]) for k in expected), run


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--instance_data", "no/such/folder"], "'instance_data': no such folder"),
        (["--with_prior_preservation"], "'with_prior_preservation' needs 'class_prompt'"),
        (["--num_validation_samples", "8"], "'num_validation_samples' holds out rows of 'dataset'"),
        (["--instance_data", "none", "--with_prior_preservation"], "'with_prior_preservation' needs 'instance_data'"),
        (
            ["--with_prior_preservation", "--class_prompt", "a circle", "--pretrained_pipeline", "none", "--vae", "x"],
            "'with_prior_preservation' needs 'pretrained_pipeline'",
        ),
        (["--masked_loss", "--noise_scheduler", "{variance_type: learned_range}"], "'masked_loss' does not work"),
    ],
)
def test_bad_dreambooth_config_fails_before_training(base, tmp_path, extra, message):
    instance = write_star_images(tmp_path / "stars", {})
    with pytest.raises(ConfigError, match=message) as error:
        train_ldm.main(dreambooth_args(base, tmp_path, instance, *extra))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
