"""The denoising objective, kept apart from the model and the sampler.

`diffusion_loss` maps (unet, scheduler, batch, noise, timesteps) to a per-sample loss [B]; `training_losses` is one
training step's per-sample loss built on it: it draws the noise and timesteps from the step's generator, weights
(min-SNR) and adds the VLB term; `training_loss` is their mean. `train_ldm` (which splits the per-sample losses for
DreamBooth's prior preservation), its validation loss and `benchmarks/training.py` all call these, so what is
validated and benchmarked is what trains. The scheduler's config decides the target
(`prediction_type`) and whether the U-Net also predicts its variance (`variance_type="learned_range"`, trained with
Improved DDPM's L_hybrid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_noise(
    shape: torch.Size, generator: torch.Generator | None = None, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise of `shape` `(B, C, H, W)` on the generator's device, optionally with a per-channel offset.

    Noise offset (Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise) lets the model
    change the mean brightness of an image, which plain Gaussian noise never fully destroys.
    """
    device = None if generator is None else generator.device
    noise = torch.randn(shape, generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
    return noise


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform timesteps in [0, num_train_timesteps) on the generator's device, shape [B], long."""
    device = None if generator is None else generator.device
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)


def min_snr_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556).

    The weight min(SNR, gamma) is expressed for the configured target: divided by SNR for epsilon, by SNR + 1
    for v-prediction, and used as is for sample prediction. Returns ones when `snr_gamma` is None.

    Args:
        timesteps (`torch.Tensor` of shape `(B,)`): the training timesteps.
    Returns:
        `torch.Tensor` of shape `(B,)`, float32.
    """
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = scheduler.snr(timesteps).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    input_perturbation: float = 0.0,
    perturbation_noise: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample denoising loss of `unet` on one batch.

    Args:
        latents (`torch.Tensor` of shape `(B, C, H, W)`): clean (scaled) latents x_0.
        noise (`torch.Tensor` of shape `(B, C, H, W)`): the noise that makes x_t; also the epsilon target.
        timesteps (`torch.Tensor` of shape `(B,)`): training timesteps.
        encoder_hidden_states (`torch.Tensor` of shape `(B, S, D)`): text encoder states.
        encoder_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 for tokens to attend to.
        input_perturbation: scale of the extra noise mixed into x_t only (Ning et al. 2023,
            https://arxiv.org/abs/2301.11706); the target keeps the original noise.
        perturbation_noise (`torch.Tensor` like `noise`): the extra noise; required when `input_perturbation`.
        loss_mask (`torch.Tensor` of shape `(B, 1, H, W)`, *optional*): weights in [0, 1] of each latent position;
            the error is then averaged over the mask (its weighted mean), so only masked positions count and a mask
            of ones gives the plain mean. Not with a learned variance (the VLB term is per sample).
        time_ids (`torch.Tensor` of shape `(B, 6)`, *optional*): each image's size and crop, for a U-Net with
            `addition_time_embed_dim` (SDXL's micro-conditioning; `ImageTransform.with_time_ids` gives them).

    Returns:
        `(mse, vlb)`: `mse` of shape `(B,)`, the mean squared error to the target of the scheduler's
        `prediction_type`; `vlb` of shape `(B,)` in bits/dim when the scheduler learns the variance
        (`learned_range`), computed with the predicted mean detached (Improved DDPM's L_hybrid), else `None`.
    """
    noisy_input = noise if not input_perturbation else noise + input_perturbation * perturbation_noise
    noisy_latents = scheduler.add_noise(latents, noisy_input, timesteps)
    added_cond_kwargs = None if time_ids is None else {"time_ids": time_ids}
    model_output = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        added_cond_kwargs=added_cond_kwargs,
    ).sample

    channels = latents.shape[1]
    learns_variance = scheduler.config.variance_type in ("learned", "learned_range")
    prediction = model_output[:, :channels] if learns_variance else model_output
    target = scheduler.get_target(latents, noise, timesteps)
    squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_mask is None:
        mse = squared_error.mean(dim=(1, 2, 3))
    else:
        if learns_variance:
            raise ValueError("loss_mask does not apply to a learned variance: its VLB term is one number per sample.")
        # The weighted mean over positions and channels: sum(m * e) / (C * sum(m)); 0 for an empty mask (an image
        # transparent everywhere), not 0 / 0.
        mask = loss_mask.to(squared_error.dtype)
        area = mask.sum(dim=(1, 2, 3)).clamp_min(torch.finfo(mask.dtype).tiny)
        mse = (squared_error * mask).sum(dim=(1, 2, 3)) / (area * channels)

    vlb = None
    if learns_variance:
        vlb = scheduler.vlb_terms(
            model_output.float(), latents.float(), noisy_latents.float(), timesteps, detach_mean=True
        )
    return mse, vlb


@dataclass(frozen=True)
class Objective:
    """What a training step minimises besides the scheduler's target (the `train_ldm` keys of the same names)."""

    snr_gamma: float | None = 5.0  # min-SNR-gamma weighting (Hang et al. 2023); None = plain MSE
    noise_offset: float = 0.0  # offset noise scale
    input_perturbation: float = 0.0  # input perturbation scale (Ning et al. 2023)
    vlb_weight: float = 0.001  # lambda of L_hybrid = L_simple + lambda * L_vlb, when the variance is learned


def training_losses(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    objective: Objective,
    generator: torch.Generator,
    loss_mask: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-sample loss of one training step on one (micro-)batch: noise, timesteps, `diffusion_loss`, weights,
    VLB term.

    The noise, the input perturbation and the timesteps are drawn, in that order, from `generator` (a CPU
    generator, so that a seed gives the same draws on every device) and moved to `latents.device`.

    Args:
        latents (`torch.Tensor` of shape `(B, C, H, W)`): clean (scaled) latents x_0.
        encoder_hidden_states (`torch.Tensor` of shape `(B, S, D)`): text encoder states.
        encoder_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 for tokens to attend to.
        objective (`Objective`): weighting, noise offset, input perturbation and VLB weight.
        generator (`torch.Generator`): the step's CPU generator.
        loss_mask (`torch.Tensor` of shape `(B, 1, H, W)`, *optional*): where the loss counts (see `diffusion_loss`).
        time_ids (`torch.Tensor` of shape `(B, 6)`, *optional*): size-and-crop ids (see `diffusion_loss`).

    Returns:
        `(losses, logs)`: the loss of each sample, shape `(B,)` (their mean is the loss to backpropagate, unless the
        caller weights them), and detached per-term means (`mse`, and `vlb` when the variance is learned) for logging.
    """
    noise = sample_noise(latents.shape, generator, objective.noise_offset)
    perturbation = None
    if objective.input_perturbation:
        perturbation = torch.randn(latents.shape, generator=generator, device=generator.device)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator)
    device = latents.device
    mse, vlb = diffusion_loss(
        unet,
        scheduler,
        latents,
        noise.to(device),
        timesteps.to(device),
        encoder_hidden_states,
        encoder_attention_mask,
        input_perturbation=objective.input_perturbation,
        perturbation_noise=None if perturbation is None else perturbation.to(device),
        loss_mask=None if loss_mask is None else loss_mask.to(device),
        time_ids=None if time_ids is None else time_ids.to(device),
    )
    losses = mse * min_snr_weights(scheduler, timesteps.to(device), objective.snr_gamma)
    logs = {"mse": mse.detach().mean()}
    if vlb is not None:
        losses = losses + objective.vlb_weight * vlb
        logs["vlb"] = vlb.detach().mean()
    return losses, logs


def training_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    objective: Objective,
    generator: torch.Generator,
    loss_mask: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss of one training step: the mean of `training_losses` (same arguments), and its logs."""
    losses, logs = training_losses(
        unet,
        scheduler,
        latents,
        encoder_hidden_states,
        encoder_attention_mask,
        objective,
        generator,
        loss_mask,
        time_ids,
    )
    return losses.mean(), logs
