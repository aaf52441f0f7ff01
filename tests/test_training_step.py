"""One training step, one function: `latentddpm.losses.training_losses` (whose mean is `training_loss`) is what
train_ldm's loop, its validation loss and `benchmarks/training.py` run, and it computes the documented loss (checked
against diffusers' `DDPMScheduler` and `compute_snr`, written out by hand)."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_LDM_CONFIG
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import compute_snr

from benchmarks.training import ours_loss
from latentddpm import losses
from latentddpm.batching import ShuffledStream, step_generator
from latentddpm.cache import LatentCache
from latentddpm.configs import config_path
from latentddpm.latents import scale_latents
from latentddpm.models import ConditionalUNet
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.training import train_ldm
from latentddpm.validation import validation_loss

SEED, BATCH, OFFSET, PERTURBATION, SNR_GAMMA = 3, 8, 0.1, 0.2, 5.0
# The tiny U-Net as train_ldm sizes it for tests/tiny_ldm.yaml: 16 px / 4 (the tiny VAE), all-MiniLM's 384 widths.
SHAPES = dict(sample_size=4, in_channels=4, out_channels=4, cross_attention_dim=384)


def oracle_loss(unet, scheduler: DDPMScheduler, latents, hidden, mask, generator) -> torch.Tensor:
    """The step's loss written out: offset noise, input perturbation, v-target, min-SNR / (SNR + 1) weights."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator) + OFFSET * torch.randn((b, c, 1, 1), generator=generator)
    perturbation = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = scheduler.add_noise(latents, noise + PERTURBATION * perturbation, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, hidden, encoder_attention_mask=mask).sample
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=SNR_GAMMA) / (snr + 1)
    return (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()


@pytest.fixture(scope="module")
def first_step(tiny_vae, tmp_path_factory):
    """train_ldm's step 0, its `training_losses` call recorded (inputs, U-Net weights, generator state, mean loss)."""
    tmp_path = tmp_path_factory.mktemp("step")
    recorded = []

    def recording_losses(unet, scheduler, latents, hidden, mask, objective, generator, loss_mask, time_ids):
        assert loss_mask is None and time_ids is None  # no masked_loss, no size_conditioning
        inputs = dict(
            weights={k: v.clone() for k, v in unet.state_dict().items()},
            latents=latents.clone(),
            hidden=hidden.clone(),
            mask=mask.clone(),
            objective=objective,
            generator_state=generator.get_state(),
        )
        sample_losses, logs = losses.training_losses(unet, scheduler, latents, hidden, mask, objective, generator)
        loss = sample_losses.detach().mean()
        recorded.append(inputs | {"loss": loss, "scheduler_config": dict(scheduler.config)})
        return sample_losses, logs

    AcceleratorState._reset_state(reset_partial_state=True)
    patch = pytest.MonkeyPatch()
    patch.setattr(train_ldm, "training_losses", recording_losses)
    try:
        out = train_ldm.main(
            [
                "--config", str(TINY_LDM_CONFIG),
                "--unet_config", str(config_path("unet/tiny.json")),
                "--vae", str(tiny_vae),
                "--seed", str(SEED), "--train_batch_size", str(BATCH), "--max_train_steps", "1",
                "--noise_offset", str(OFFSET), "--input_perturbation", str(PERTURBATION),
                "--snr_gamma", str(SNR_GAMMA),
                "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"),
            ]
        )  # fmt: skip
    finally:
        patch.undo()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(recorded) == 1  # one step, one micro-batch: validation (at the end) does not call it from the loop
    cache = LatentCache(next(Path(tmp_path / "cache").iterdir()))
    return recorded[0], cache, out


def tiny_unet(weights) -> ConditionalUNet:
    unet = ConditionalUNet.from_config(ConditionalUNet.load_config(str(config_path("unet/tiny.json"))), **SHAPES)
    unet.load_state_dict(weights)
    return unet


def test_train_ldm_step_feeds_training_loss_the_step_batch(first_step, tiny_vae):
    step, cache, _ = first_step
    vae = AutoencoderKL.from_pretrained(str(tiny_vae))
    rows = ShuffledStream(len(cache) - 8, BATCH, seed=SEED).indices(0)  # tiny_ldm.yaml holds out 8 rows
    generator = step_generator(SEED, 0, 0)
    drawn = cache.draw(rows, generator, caption_dropout=0.1)
    latents, caption_ids = scale_latents(vae, drawn["latents"]), drawn["caption_ids"]
    hidden, mask = cache.text(caption_ids)
    assert torch.equal(step["latents"], latents)
    assert torch.equal(step["hidden"], hidden) and torch.equal(step["mask"], mask)
    assert torch.equal(step["generator_state"], generator.get_state())  # the draws that follow are the loss's own
    assert step["objective"] == losses.Objective(SNR_GAMMA, OFFSET, PERTURBATION, 0.001)


def test_training_loss_is_the_documented_loss(first_step):
    step, _, _ = first_step
    unet = tiny_unet(step["weights"]).train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(step["generator_state"])
    with torch.no_grad():
        expected = oracle_loss(
            unet, DDPMScheduler.from_config(step["scheduler_config"]), step["latents"], step["hidden"], step["mask"],
            generator,
        )  # fmt: skip
    torch.testing.assert_close(step["loss"], expected, rtol=1e-5, atol=1e-6)


def test_benchmark_step_computes_the_training_step_loss(first_step):
    step, _, _ = first_step
    unet = tiny_unet(step["weights"]).train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(step["generator_state"])
    batch = {"sample": step["latents"], "encoder_hidden_states": step["hidden"]}
    batch["encoder_attention_mask"] = step["mask"]
    scheduler = DDPMNoiseScheduler.from_config(step["scheduler_config"])
    with torch.no_grad():
        loss = ours_loss(unet, batch, generator, scheduler, step["objective"])
    torch.testing.assert_close(loss, step["loss"], rtol=1e-5, atol=1e-6)


def test_validation_loss_is_the_training_loss_on_held_out_rows(first_step, tiny_vae):
    step, cache, _ = first_step
    vae = AutoencoderKL.from_pretrained(str(tiny_vae))
    unet = tiny_unet(step["weights"]).eval()
    scheduler = DDPMNoiseScheduler.from_config(step["scheduler_config"])
    rows = torch.arange(len(cache) - 8, len(cache))
    got = validation_loss(unet, scheduler, cache, rows, vae, step["objective"], seed=SEED)

    generator = step_generator(SEED, micro_step=0, process_index=10_000)  # validation's fixed draws
    drawn = cache.draw(rows, generator, caption_dropout=0.0)
    latents, caption_ids = scale_latents(vae, drawn["latents"]), drawn["caption_ids"]
    with torch.no_grad():
        oracle_scheduler = DDPMScheduler.from_config(step["scheduler_config"])
        expected = oracle_loss(unet, oracle_scheduler, latents, *cache.text(caption_ids), generator)
    assert got == pytest.approx(expected.item(), rel=1e-5)
