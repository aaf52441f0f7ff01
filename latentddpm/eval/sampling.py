"""Sampling a pipeline for evaluation: seeded images for a list of prompts, as tensors, PIL images or a grid."""

import math

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor


@torch.no_grad()
def generate_images(
    pipeline, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 50
) -> torch.Tensor:
    """One image per prompt, in batches whose generators are seeded with `seed + index of the batch's first prompt`.

    The generators are CPU generators whatever the pipeline's device: CPU and CUDA draw different numbers from one
    seed, and a CPU generator makes `randn_tensor` draw the initial noise on the CPU and move it, so a seed gives the
    same starting noise (and, up to floating point, the same images and scores) on every device. Seeding each batch
    by its first index makes image `i` independent of everything but `seed` and `batch_size`.

    Args:
        pipeline (`LatentDDPMPipeline`): the model.
        prompts (`list[str]`): one image is drawn for each.
        num_inference_steps (`int`), guidance_scale (`float`): passed to the pipeline.
        seed (`int`, defaults to 0): seeds the noise.
        batch_size (`int`, defaults to 50): prompts per pipeline call.

    Returns:
        `torch.Tensor` of shape `(N, 3, H, W)`: float32 images in `[0, 1]`, on the CPU.
    """
    images = []
    for start in range(0, len(prompts), batch_size):
        images.append(
            pipeline(
                prompts[start : start + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed + start),
                output_type="pt",
            )
            .images.float()
            .cpu()
        )
    return torch.cat(images)


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """`(N, 3, H, W)` images in `[0, 1]` -> PIL images, rounded as a pipeline's `output_type="pil"` does."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))


def grid_shape(num_images: int) -> tuple[int, int]:
    """`(rows, cols)` of the most square grid that `num_images` fill exactly, for diffusers' `make_image_grid`: as
    many rows as the largest divisor of `num_images` that is at most its square root (8 x 8 for 64, 1 x 5 for 5)."""
    rows = max(d for d in range(1, math.isqrt(num_images) + 1) if num_images % d == 0)
    return rows, num_images // rows
