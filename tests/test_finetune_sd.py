"""Fine-tuning a Stable Diffusion checkpoint with train_ldm (`--pretrained_pipeline` an SD diffusers folder): the
checkpoint's noise process and prompt convention are kept, the run resumes exactly, and the result exports back to
diffusers' own `StableDiffusionPipeline` with the same images."""

import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_sd import make_clip_tokenizer, make_stable_diffusion

from latentddpm import ConditionalUNet, LatentDDPMPipeline
from latentddpm.training import train_ldm


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random SD 1.x pipeline (scaled-linear betas 0.00085-0.012, epsilon, steps_offset 1, PNDM) on disk."""
    folder = tmp_path_factory.mktemp("sd1")
    make_stable_diffusion(1, make_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))).save_pretrained(folder)
    return folder


def finetune(sd_folder, out, *extra):
    return train_ldm.main(
        [
            "--pretrained_pipeline", str(sd_folder),
            "--dataset", "shapes", "--resolution", "16", "--shapes_num_images", "24", "--num_validation_samples", "4",
            "--train_batch_size", "4", "--max_train_steps", "4", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
            "--validation_steps", "0", "--validation_prompts", "a red circle", "--validation_inference_steps", "2",
            "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), "--report_to", "none", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(sd_folder, tmp_path_factory):
    return finetune(sd_folder, tmp_path_factory.mktemp("finetune") / "run", "--checkpointing_steps", "2")


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_finetuning_keeps_the_checkpoints_noise_process_and_prompt_convention(finetuned, sd_folder):
    pipe = LatentDDPMPipeline.from_pretrained(str(finetuned))
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.prediction_type, config.steps_offset) == ("epsilon", 1)
    assert config.clip_sample is False  # StableDiffusionPipeline never clips x_0 (a PNDM config has no such key)
    assert pipe.config.use_attention_mask is False  # Stable Diffusion attends to the whole padded prompt
    assert isinstance(pipe.unet, ConditionalUNet)
    original = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    assert pipe.tokenizer.model_max_length == original.tokenizer.model_max_length == 77
    # the fine-tune moved the weights away from the checkpoint's (our U-Net keeps SD's module names)
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in original.unet.state_dict().items() if k in trained)


def test_finetuning_resumes_exactly(finetuned, sd_folder, tmp_path):
    checkpoint = finetuned / "checkpoints" / "checkpoint-2"
    resumed = finetune(sd_folder, tmp_path / "run", "--resume_from_checkpoint", str(checkpoint))
    expected = unet_weights(finetuned)
    got = unet_weights(resumed)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_finetuned_pipeline_exports_to_stable_diffusion_with_the_same_images(finetuned, tmp_path):
    ours = LatentDDPMPipeline.from_pretrained(str(finetuned))
    ours.to_stable_diffusion().save_pretrained(tmp_path / "sd")
    theirs = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"))
    assert type(theirs.scheduler).__name__ == "DDPMScheduler"

    def sample(pipe):
        return pipe(
            ["a red circle in the center", "a blue square"],
            negative_prompt=["", "a green triangle"],
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    torch.testing.assert_close(sample(theirs), sample(ours), rtol=0, atol=1e-4)


def test_an_explicit_noise_scheduler_key_over_the_checkpoints_is_logged(sd_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        override = ["--noise_scheduler", "{prediction_type: v_prediction}"]
        out = finetune(sd_folder, tmp_path / "run", "--max_train_steps", "1", *override)
    assert "prediction_type='v_prediction' replaces the pretrained checkpoint's 'epsilon'" in caplog.text
    config = LatentDDPMPipeline.from_pretrained(str(out)).scheduler.config
    assert (config.prediction_type, config.beta_schedule) == ("v_prediction", "scaled_linear")
