"""Moving between pixels and the diffusion model's latent space.

This module is the one place where `vae.config.scaling_factor` and `vae.config.shift_factor` are applied, so
training and sampling cannot disagree about them. Latent scaling gives the latents roughly unit variance, which the
noise schedule assumes (Rombach et al. 2022, section 4.3.2 and appendix G, https://arxiv.org/abs/2112.10752).
"""

import torch
from diffusers import AutoencoderKL, AutoencoderTiny


def vae_scale_factor(vae: AutoencoderKL | AutoencoderTiny) -> int:
    """Spatial downsampling factor of the VAE: each encoder stage but the last halves height and width.

    Both `AutoencoderKL` and `AutoencoderTiny` record `block_out_channels` in their config.
    """
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scale_latents(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> diffusion latents: `(latents - shift_factor) * scaling_factor`.

    `shift_factor` is applied where the VAE config has one that is not `None` (e.g. the FLUX and SD3 VAEs).

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): the VAE whose config holds the factors.
        latents (`torch.Tensor` of shape `(B, C, h, w)`): raw latents as returned by the encoder.

    Returns:
        `torch.Tensor` of shape `(B, C, h, w)`: scaled latents.
    """
    shift_factor = vae.config.get("shift_factor")
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * vae.config.scaling_factor


def unscale_latents(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> raw VAE latents; the inverse of [`scale_latents`]."""
    latents = latents / vae.config.scaling_factor
    shift_factor = vae.config.get("shift_factor")
    if shift_factor is not None:
        latents = latents + shift_factor
    return latents


def encode_images(
    vae: AutoencoderKL | AutoencoderTiny,
    pixel_values: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample_posterior: bool = True,
) -> torch.Tensor:
    """Encode images to scaled diffusion latents.

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): the VAE.
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[-1, 1]`, on the device the VAE runs on
            (with model CPU offload the VAE moves there only when called).
        generator (`torch.Generator` or a list of them, *optional*): draws the posterior sample of an
            `AutoencoderKL`; one generator per image when a list.
        sample_posterior (`bool`, defaults to `True`): for an `AutoencoderKL`, sample the diagonal Gaussian posterior
            (what latent diffusion trains on); `False` takes its mean. `AutoencoderTiny` is deterministic.

    Returns:
        `torch.Tensor` of shape `(B, C, H // f, W // f)`, with `f = vae_scale_factor(vae)`: scaled latents.
    """
    pixel_values = pixel_values.to(vae.dtype)
    if isinstance(vae, AutoencoderTiny):
        latents = vae.encode(pixel_values).latents
    else:
        posterior = vae.encode(pixel_values).latent_dist
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
    return scale_latents(vae, latents)


def decode_latents(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled diffusion latents to images.

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): the VAE.
        latents (`torch.Tensor` of shape `(B, C, h, w)`): scaled latents, as returned by [`encode_images`], on the
            device the VAE runs on.

    Returns:
        `torch.Tensor` of shape `(B, 3, h * f, w * f)`: images clamped to `[-1, 1]`.
    """
    latents = unscale_latents(vae, latents.to(vae.dtype))
    return vae.decode(latents).sample.clamp(-1, 1)
