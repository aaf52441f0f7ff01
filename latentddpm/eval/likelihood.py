"""Negative log-likelihood bound of held-out data under the latent diffusion model, in latent-space bits/dim.

The variational bound L_vlb = L_T + sum_{t>1} L_{t-1} + L_0 (formula (5) of Ho et al. 2020,
https://arxiv.org/abs/2006.11239) upper-bounds -log p(z_0 | caption) of the latents z_0 of an image. It is the number
the DDPM paper reports (in pixel space); diffusers has no way to compute it. Here it is in the VAE's latent space: it
measures how well the denoiser models the latents, and is not comparable with pixel-space bits/dim (it ignores the
VAE's own reconstruction term and depends on the latent scaling).
"""

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..latents import encode_images
from ..schedulers import DDPMNoiseScheduler
from ..text import encode_prompt

LIKELIHOOD_NOTE = (
    "latent-space bits/dim: variational bound on -log p(latents | caption); not comparable with pixel-space bits/dim"
)


@torch.no_grad()
def latent_bits_per_dim(
    unet: torch.nn.Module,
    scheduler: DDPMNoiseScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    stride: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The bound -ELBO of each latent, in bits/dim, from `scheduler.calculate_bpd`.

    Args:
        unet (`torch.nn.Module`): the denoiser, called as `UNet2DConditionModel` is.
        scheduler (`DDPMNoiseScheduler`): the training scheduler (betas, prediction and variance type).
        latents (`torch.Tensor` of shape `(B, C, h, w)`): scaled latents z_0, as `encode_images` returns them.
        encoder_hidden_states (`torch.Tensor` of shape `(B, S, D)`): the caption embeddings.
        encoder_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 on real tokens, 0 on padding.
        stride (`int`, defaults to 1): 1 sums all T terms; `k > 1` draws one KL term per block of k timesteps above
            t = k and evaluates t <= k each: an unbiased estimate at about T / k + k model calls (see
            `DDPMNoiseScheduler.calculate_bpd`).
        generator (`torch.Generator`, *optional*): draws the noise of each term.

    Returns:
        `torch.Tensor` of shape `(B,)`: bits per latent dimension.
    """

    def model_fn(noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=False,
        )[0]

    return scheduler.calculate_bpd(model_fn, latents, generator=generator, stride=stride)


@torch.no_grad()
def evaluate_likelihood(
    pipeline,
    batches: Iterable[tuple[torch.Tensor, list[str]]],
    stride: int = 1,
    seed: int = 0,
    total: int | None = None,
) -> dict[str, float | int | str]:
    """Mean latent-space bits/dim of held-out images under a `LatentDDPMPipeline`'s U-Net, given their captions.

    Images are encoded to posterior samples (the latents training sees) with a seeded generator, which also draws the
    noise of every term, so the result is deterministic for a seed. The pipeline's scheduler config is read into a
    `DDPMNoiseScheduler`, so a pipeline whose sampler was swapped still gives the bound of the training process.

    Args:
        pipeline (`LatentDDPMPipeline`): the model.
        batches (iterable of `(images, captions)`): images `torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`, and
            their `B` captions.
        stride (`int`, defaults to 1): see [`latent_bits_per_dim`].
        seed (`int`, defaults to 0): seeds the posterior samples and the noise.
        total (`int`, *optional*): number of batches, for the progress bar.

    Returns:
        `dict` with `latent_bpd` (mean), `latent_bpd_sem` (its standard error over images), `n`, `stride`,
        `num_train_timesteps` and `note` (what the number is).
    """
    scheduler = DDPMNoiseScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    # the text conditioning the U-Net was trained with: masked padding, or Stable Diffusion's unmasked one
    use_attention_mask = pipeline.config.use_attention_mask
    values = []
    for images, captions in tqdm(batches, total=total, desc="likelihood", leave=False):
        latents = encode_images(pipeline.vae, images.to(pipeline.device) * 2 - 1, generator=generator)
        hidden_states, attention_mask = encode_prompt(
            captions, pipeline.tokenizer, pipeline.text_encoder, use_attention_mask=use_attention_mask
        )
        bpd = latent_bits_per_dim(
            pipeline.unet,
            scheduler,
            latents.to(pipeline.unet.dtype),
            hidden_states.to(pipeline.unet.dtype),
            attention_mask if use_attention_mask else None,
            stride=stride,
            generator=generator,
        )
        values.append(bpd.double().cpu().numpy())
    if not values:
        raise ValueError("evaluate_likelihood got no images.")
    values = np.concatenate(values)
    return {
        "latent_bpd": float(values.mean()),
        "latent_bpd_sem": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan"),
        "n": len(values),
        "stride": stride,
        "num_train_timesteps": scheduler.config.num_train_timesteps,
        "note": LIKELIHOOD_NOTE,
    }
