"""Moving between pixels and the diffusion model's latent space.

This module is the one place where `vae.config.scaling_factor` and `vae.config.shift_factor` are applied, so
training and sampling cannot disagree about them. Latent scaling gives the latents roughly unit variance, which the
noise schedule assumes (Rombach et al. 2022, section 4.3.2 and appendix G, https://arxiv.org/abs/2112.10752).

A float16 VAE whose encoder or decoder overflows (float16 ends at 65504) is rerun in float32 for that call, with a
warning: the reason diffusers has `force_upcast` and the SDXL fp16-fix VAE
(https://huggingface.co/madebyollin/sdxl-vae-fp16-fix).
"""

import warnings
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor


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


def _run_with_fp32_fallback(
    vae: AutoencoderKL | AutoencoderTiny, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """`forward(inputs)` in the VAE's dtype; for a float16 VAE whose output has inf/NaN, once more in float32.

    The VAE is upcast for that call only; the float32 result is cast back to float16, whose range it fits in (only
    intermediate activations overflowed).
    """
    dtype = vae.dtype
    output = forward(inputs.to(dtype))
    # The check costs a device sync: only float16 overflows where float32 does not (bfloat16 has float32's range).
    if dtype != torch.float16 or torch.isfinite(output).all():
        return output
    warnings.warn(
        f"The float16 VAE ({type(vae).__name__}) produced inf/NaN in `{forward.__name__}`: running it in float32 "
        "instead. Load the VAE in float32 or bfloat16, or use a VAE fine-tuned for float16, to avoid the cost.",
        RuntimeWarning,
        stacklevel=3,
    )
    vae.to(torch.float32)
    try:
        output = forward(inputs.float())
    finally:
        vae.to(dtype)
    return output.to(dtype)


def encode_posterior(
    vae: AutoencoderKL | AutoencoderTiny, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior q(z | x), before latent scaling.

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): the VAE (float16 falls back to float32 on overflow).
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[-1, 1]`, on the VAE's device.

    Returns:
        `(mean, std)`, each a `torch.Tensor` of shape `(B, C, H // f, W // f)` in the VAE's dtype. `AutoencoderTiny`
        is deterministic: its std is zero.
    """
    if isinstance(vae, AutoencoderTiny):

        def encode(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(x).latents

        latents = _run_with_fp32_fallback(vae, encode, pixel_values)
        return latents, torch.zeros_like(latents)

    def encode(x: torch.Tensor) -> torch.Tensor:  # (B, 2C, h, w): mean and log-variance
        return vae.encode(x).latent_dist.parameters

    posterior = DiagonalGaussianDistribution(_run_with_fp32_fallback(vae, encode, pixel_values))
    return posterior.mean, posterior.std


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
    mean, std = encode_posterior(vae, pixel_values)
    latents = mean
    if sample_posterior and not isinstance(vae, AutoencoderTiny):
        # What `DiagonalGaussianDistribution.sample(generator)` draws.
        latents = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
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

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample

    return _run_with_fp32_fallback(vae, decode, unscale_latents(vae, latents.to(vae.dtype))).clamp(-1, 1)
