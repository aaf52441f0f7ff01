"""End-to-end tests of the training scripts on tiny components (CPU, fp32, a few steps each)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LDM_CONFIG
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from latentddpm import LatentDDPMPipeline
from latentddpm.config import ConfigError
from latentddpm.configs import config_path
from latentddpm.eval.curves import load_scalars
from latentddpm.text import default_text_encoder_path
from latentddpm.training import train_ldm, train_vae


def ldm_args(tiny_vae, tmp_path, *extra):
    return [
        "--config", str(TINY_LDM_CONFIG),
        "--unet_config", str(config_path("unet/tiny.json")),
        "--vae", str(tiny_vae),
        "--validation_prompts", "a red circle in the center",
        "--output_dir", str(tmp_path / "run"),
        "--cache_dir", str(tmp_path / "cache"),
        *extra,
    ]  # fmt: skip


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_tiny_run_saves_a_loadable_pipeline(tiny_vae, tmp_path):
    out = train_ldm.main(ldm_args(tiny_vae, tmp_path))
    pipe = LatentDDPMPipeline.from_pretrained(str(out))
    image = pipe("a blue square in the top left", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    assert pipe.scheduler.config.clip_sample is False  # latents are unbounded: never clip x_0 to [-1, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["max_train_steps"] == 6
    assert manifest["packages"]["torch"] and manifest["dataset_fingerprint"]
    assert (out / "validation" / "step-6.png").is_file()


@pytest.mark.slow
def test_resume_mid_run_matches_uninterrupted_run(tiny_vae, tmp_path):
    straight = train_ldm.main(ldm_args(tiny_vae, tmp_path / "a"))
    checkpointed = train_ldm.main(ldm_args(tiny_vae, tmp_path / "b", "--checkpointing_steps", "3"))
    # A new process state, resuming from the step-3 snapshot, trains steps 4..6 again.
    resumed = train_ldm.main(
        ldm_args(tiny_vae, tmp_path / "c", "--resume_from_checkpoint", str(checkpointed / "checkpoints/checkpoint-3"))
    )

    expected = unet_weights(straight)  # EMA weights: the EMA state resumes too
    for run in (checkpointed, resumed):
        got = unet_weights(run)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), run


def text_encoder_weights(folder):
    return load_file(str(folder / "text_encoder" / "model.safetensors"))


@pytest.mark.slow
def test_training_the_text_encoder_changes_it_and_resumes_exactly(tiny_vae, tmp_path):
    args = ("--train_text_encoder", "true", "--text_encoder_learning_rate", "1e-4")
    straight = train_ldm.main(ldm_args(tiny_vae, tmp_path / "a", *args))
    checkpointed = train_ldm.main(ldm_args(tiny_vae, tmp_path / "b", *args, "--checkpointing_steps", "3"))
    resumed = train_ldm.main(
        ldm_args(
            tiny_vae,
            tmp_path / "c",
            *args,
            "--resume_from_checkpoint",
            str(checkpointed / "checkpoints/checkpoint-3"),
        )
    )

    pretrained = load_file(str(Path(default_text_encoder_path()) / "model.safetensors"))
    trained = text_encoder_weights(straight)
    assert set(trained) <= set(pretrained)  # the pretrained file also holds the old `position_ids` buffer
    changed = [k for k in trained if not torch.equal(trained[k], pretrained[k])]
    assert len(changed) > len(trained) // 2  # the update reached (nearly) every tensor
    for run in (checkpointed, resumed):
        assert all(torch.equal(text_encoder_weights(run)[k], trained[k]) for k in trained), run
        assert all(torch.equal(unet_weights(run)[k], v) for k, v in unet_weights(straight).items()), run
    pipe = LatentDDPMPipeline.from_pretrained(str(straight))
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_evaluation_hook_runs_every_n_steps_and_logs_its_metrics(tiny_vae, tmp_path):
    evaluation = tmp_path / "evaluation.yaml"
    evaluation.write_text(
        "data: shapes\nschedulers: [ddim]\nsteps: [2]\nguidance: [2.0]\nnum_samples: 4\nbatch_size: 4\n"
        "features: none\nshapes_num_images: 16\nreconstruction_samples: 8\ngrid_images: 4\n"
    )
    out = train_ldm.main(
        ldm_args(
            tiny_vae,
            tmp_path,
            "--evaluation_config",
            str(evaluation),
            "--evaluation_steps",
            "4",
            "--max_train_steps",
            "8",
            "--log_every",
            "1",
            "--report_to",
            "tensorboard",
        )
    )
    scalars = load_scalars(out / "logs")
    for metric in ("all_acc", "color_acc", "shape_acc", "position_acc", "seconds_per_image"):
        assert [step for step, _ in scalars[f"eval/ddim-2-cfg2/{metric}"]] == [4, 8]
    assert [step for step, _ in scalars["eval/reconstruction/psnr"]] == [4, 8]
    for step in (4, 8):
        results = json.loads((out / "evaluation" / f"step-{step}" / "metrics.json").read_text())
        (row,) = results["rows"]
        assert dict(scalars["eval/ddim-2-cfg2/color_acc"])[step] == pytest.approx(row["color_acc"])
        assert (out / "evaluation" / f"step-{step}" / "report.html").is_file()
    # Training time is logged at every step, without the time spent evaluating.
    minutes = [value for _, value in scalars["train_minutes"]]
    assert len(minutes) == 8 and all(0 < a <= b for a, b in zip(minutes, minutes[1:]))
    final = json.loads((out / "manifest.json").read_text())["final_metrics"]
    assert final["eval/ddim-2-cfg2/all_acc"] == pytest.approx(dict(scalars["eval/ddim-2-cfg2/all_acc"])[8])


def test_second_run_reuses_the_latent_cache(tiny_vae, tmp_path, caplog):
    train_ldm.main(ldm_args(tiny_vae, tmp_path, "--max_train_steps", "1"))
    cache_files = list((tmp_path / "cache").glob("*/latents-*.safetensors"))
    assert len(cache_files) == 1
    mtime = cache_files[0].stat().st_mtime_ns
    with caplog.at_level("INFO"):
        train_ldm.main(ldm_args(tiny_vae, tmp_path, "--max_train_steps", "1", "--output_dir", str(tmp_path / "run2")))
    assert "Reusing cached latents" in caplog.text
    assert cache_files[0].stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "cache").glob("*/latents-*.safetensors"))) == 1


def test_vae_stage_writes_a_data_derived_scaling_factor(tmp_path):
    out = train_vae.main(
        [
            "--config", str(config_path("shapes_vae.yaml")),
            "--block_out_channels", "8,16", "--norm_num_groups", "4",
            "--resolution", "16", "--shapes_num_images", "64", "--num_validation_samples", "8",
            "--train_batch_size", "8", "--max_train_steps", "2", "--scale_samples", "32",
            "--compute_shift_factor", "true",  # the demo's config turns it off (Stable Diffusion has none)
            "--output_dir", str(tmp_path / "vae"), "--report_to", "none",
        ]
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["final_metrics"]
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"])
    assert vae.config.shift_factor == pytest.approx(metrics["latent_mean"])
    assert metrics["psnr"] > 0


def vae_args(tmp_path, *extra):
    return [
        "--config", str(config_path("shapes_vae.yaml")),
        "--block_out_channels", "8,16", "--norm_num_groups", "4",
        "--resolution", "16", "--shapes_num_images", "64", "--num_validation_samples", "8",
        "--train_batch_size", "8", "--max_train_steps", "4", "--scale_samples", "32",
        "--output_dir", str(tmp_path), "--report_to", "none", *extra,
    ]  # fmt: skip


def test_vae_stage_with_the_patch_gan_trains_both_and_resumes_exactly(tmp_path):
    gan = ["--gan_weight", "0.5", "--gan_start_step", "1"]
    gan += ["--discriminator_channels", "8", "--discriminator_layers", "2"]
    plain = train_vae.main(vae_args(tmp_path / "plain"))
    straight = train_vae.main(vae_args(tmp_path / "gan", *gan, "--checkpointing_steps", "2"))
    checkpoint = straight / "checkpoints" / "checkpoint-2"
    resumed = train_vae.main(vae_args(tmp_path / "resumed", *gan, "--resume_from_checkpoint", str(checkpoint)))

    def weights(folder):
        return load_file(str(folder / "diffusion_pytorch_model.safetensors"))

    # the discriminator is part of the state (its weights and optimizer), so the resumed run ends where the straight
    # one does; its loss moved the VAE away from the run without it
    assert (checkpoint / "model_1.safetensors").is_file() and (checkpoint / "optimizer_1.bin").is_file()
    assert all(torch.equal(weights(resumed)[k], v) for k, v in weights(straight).items())
    assert not all(torch.equal(weights(plain)[k], v) for k, v in weights(straight).items())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learnig_rate", "1"], "Did you mean 'learning_rate'"),
        (["--max_train_steps", "-1"], "'max_train_steps' must be > 0"),
        (["--caption_column", "caption"], "caption"),
        (["--evaluation_config", "no/such/eval.yaml"], "'evaluation_config': no such file"),
    ],
)
def test_bad_config_fails_before_training(tiny_vae, tmp_path, extra, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        train_ldm.main(ldm_args(tiny_vae, tmp_path, *extra))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vae_stage_stops_on_repeated_non_finite_gradients(tmp_path):
    # A learning rate of 1e30 blows the weights up after the first update; every later step has NaN gradients.
    with pytest.raises(RuntimeError, match=r"Stopping at step 3: 3 steps in a row had non-finite"):
        train_vae.main(
            [
                "--config", str(config_path("shapes_vae.yaml")),
                "--block_out_channels", "8,16", "--norm_num_groups", "4",
                "--resolution", "16", "--shapes_num_images", "64", "--num_validation_samples", "8",
                "--train_batch_size", "8", "--max_train_steps", "10", "--lr_warmup_steps", "0",
                "--learning_rate", "1e30", "--lr_scheduler", "constant", "--max_grad_norm", "none",
                "--max_consecutive_nonfinite", "3",
                "--output_dir", str(tmp_path / "vae"), "--report_to", "none",
            ]
        )  # fmt: skip


def test_vae_stage_without_held_out_images_trains_and_saves_without_psnr(tmp_path):
    out = train_vae.main(vae_args(tmp_path / "vae", "--num_validation_samples", "0", "--max_train_steps", "1"))
    metrics = json.loads((out / "manifest.json").read_text())["final_metrics"]
    assert "psnr" not in metrics and metrics["latent_std"] > 0
    assert AutoencoderKL.from_pretrained(str(out)).config.scaling_factor == pytest.approx(1 / metrics["latent_std"])


def test_training_without_the_attention_mask_saves_a_pipeline_that_reads_prompts_unmasked(tiny_vae, tmp_path):
    """`use_attention_mask: false` (Stable Diffusion's convention): the cache holds all-ones masks, the U-Net trains
    on the whole padded prompt, and the saved pipeline records it, so it samples the same way."""
    out = train_ldm.main(ldm_args(tiny_vae, tmp_path, "--use_attention_mask", "false", "--max_train_steps", "2"))
    pipe = LatentDDPMPipeline.from_pretrained(str(out))
    assert pipe.config.use_attention_mask is False
    (cache_file,) = (tmp_path / "cache").glob("*/text-*.safetensors")
    assert bool((load_file(str(cache_file))["text_mask"] == 1).all())
    image = pipe("a red circle in the center", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
