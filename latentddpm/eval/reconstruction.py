"""How well the VAE reconstructs images (PSNR, SSIM) and what its latents look like (mean, std, scaling factor).

The diffusion model can be no sharper than the VAE decodes, so these numbers bound sample quality from above; the
latent std times the scaling factor in use should be near 1, the variance the noise schedule assumes (Rombach et
al. 2022, sec. 4.3.2 and appendix G, https://arxiv.org/abs/2112.10752).
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm.auto import tqdm

from ..latents import decode_latents, encode_images, unscale_latents


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE), in dB.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): the images to score.
        reference (`torch.Tensor` of shape `(B, C, H, W)`): the originals.
        data_range (`float`, defaults to 1.0): max - min of the value range (1 for `[0, 1]`, 2 for `[-1, 1]`).

    Returns:
        `torch.Tensor` of shape `(B,)`, float64; `inf` for identical images.
    """
    mse = ((images.double() - reference.double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps, `torch.Tensor` of shape `(size,)`, float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    images: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to
    Structural Similarity", eq. 13), with their 11x11 Gaussian window of sigma 1.5, over the windows that fit inside
    the image ("valid" filtering, as their reference implementation), averaged over windows and channels.

    Local means, variances and covariance are Gaussian-weighted; the window is separable, so it is applied as a
    horizontal then a vertical 1-D convolution per channel.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): the images to score; `H, W >= window_size`.
        reference (`torch.Tensor` of shape `(B, C, H, W)`): the originals.
        data_range (`float`, defaults to 1.0): max - min of the value range; sets C1 = (k1 L)^2 and C2 = (k2 L)^2.
        window_size (`int`, defaults to 11), sigma (`float`, defaults to 1.5): the Gaussian window.
        k1 (`float`, defaults to 0.01), k2 (`float`, defaults to 0.03): the stabilising constants of the paper.

    Returns:
        `torch.Tensor` of shape `(B,)`, float64; 1 for identical images.
    """
    if images.shape != reference.shape or images.ndim != 4:
        raise ValueError(
            f"images and reference must be (B, C, H, W) of one shape, got {tuple(images.shape)} and"
            f" {tuple(reference.shape)}."
        )
    if min(images.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(images.shape[-2:])}.")
    channels = images.shape[1]
    window = gaussian_window(window_size, sigma).to(images.device)
    horizontal = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)

    x, y = images.double(), reference.double()
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


@torch.no_grad()
def evaluate_reconstruction(
    vae: AutoencoderKL | AutoencoderTiny,
    batches: Iterable[torch.Tensor],
    generator: torch.Generator | None = None,
    total: int | None = None,
) -> dict[str, float]:
    """PSNR and SSIM of VAE round trips, and statistics of the latents the diffusion model sees.

    Reconstructions decode the posterior mean; the latent statistics are of posterior samples (what training
    encodes), accumulated in float64 over all batches.

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): the VAE.
        batches (iterable of `torch.Tensor` of shape `(B, 3, H, W)`): images in `[0, 1]`.
        generator (`torch.Generator`, *optional*): draws the posterior samples.
        total (`int`, *optional*): number of batches, for the progress bar.

    Returns:
        `dict` with `psnr` (dB) and `ssim` (means over images, on `[0, 1]` images), `latent_mean` and `latent_std`
        (of the scaled latents, over all elements), `raw_latent_std` (before scaling), `scaling_factor` (in use),
        `suggested_scaling_factor` (1 / raw std after the shift, which would make the scaled std 1) and `n`.
    """
    psnr_sum = ssim_sum = 0.0
    count = 0
    moments = torch.zeros(3, dtype=torch.float64)  # number of elements, sum, sum of squares of the scaled latents
    raw_moments = torch.zeros(3, dtype=torch.float64)  # the same, of the raw latents minus the shift factor
    shift_factor = vae.config.get("shift_factor") or 0.0
    for images in tqdm(batches, total=total, desc="VAE reconstruction", leave=False):
        pixels = images.to(vae.device, vae.dtype) * 2 - 1
        reconstructions = (decode_latents(vae, encode_images(vae, pixels, sample_posterior=False)).float() + 1) / 2
        images = images.to(reconstructions.device, torch.float32)
        psnr_sum += psnr(reconstructions, images).sum().item()
        ssim_sum += ssim(reconstructions, images).sum().item()
        count += len(images)

        latents = encode_images(vae, pixels, generator=generator).double()
        raw = unscale_latents(vae, latents) - shift_factor
        moments += torch.stack([torch.tensor(latents.numel()), latents.sum().cpu(), (latents**2).sum().cpu()])
        raw_moments += torch.stack([torch.tensor(raw.numel()), raw.sum().cpu(), (raw**2).sum().cpu()])

    if count == 0:
        raise ValueError("evaluate_reconstruction got no images.")

    def mean_std(stats: torch.Tensor) -> tuple[float, float]:
        mean = stats[1] / stats[0]
        return mean.item(), (stats[2] / stats[0] - mean**2).clamp(min=0).sqrt().item()

    latent_mean, latent_std = mean_std(moments)
    _, raw_std = mean_std(raw_moments)
    return {
        "psnr": psnr_sum / count,
        "ssim": ssim_sum / count,
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "raw_latent_std": raw_std,
        "scaling_factor": float(vae.config.scaling_factor),
        "suggested_scaling_factor": 1 / raw_std,
        "n": count,
    }
