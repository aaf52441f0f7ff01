"""Aspect-ratio buckets: image sizes of about `resolution**2` pixels, so portrait and landscape photos train uncropped.

Every training batch comes from one bucket (see `latentddpm.batching.BucketedStream`), so its latents stack. This
is the bucketing of NovelAI (https://github.com/NovelAI/novelai-aspect-ratio-bucketing), kohya's sd-scripts and
Stable Diffusion XL (Podell et al. 2023, section 2.3, https://arxiv.org/abs/2307.01952). Sizes are `(height, width)`
throughout, as in tensors and in SDXL's micro-conditioning.
"""

from collections.abc import Sequence
from fractions import Fraction

from diffusers import AutoencoderKL, AutoencoderTiny

from .latents import vae_scale_factor
from .models import ConditionalUNet


def aspect_ratio_buckets(resolution: int, multiple: int, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """The `(height, width)` buckets of at most `resolution**2` pixels, sides multiples of `multiple`.

    The rule: for every height `h <= resolution` that is a multiple of `multiple`, the widest bucket that fits,
    `w = (resolution**2 // (h * multiple)) * multiple`, kept when `w / h <= max_aspect_ratio`; then each of these
    landscape buckets turned on its side (`(w, h)`), so portrait and landscape images get mirrored buckets. The widths
    fall strictly as the height grows, so no bucket is a crop of another, and `(resolution, resolution)` is always
    one. With `resolution=1024, multiple=64` the landscape buckets 768x1344, 832x1216, 896x1152 and 960x1088 are
    those of SDXL's table that have no wider bucket of the same height.

    Args:
        resolution (`int`): Side of the square bucket, in pixels; a multiple of `multiple`.
        multiple (`int`): What every side is a multiple of, such as [`bucket_multiple`].
        max_aspect_ratio (`float`, defaults to 2.0): Longest over shortest side allowed; at least 1.

    Returns:
        `list[tuple[int, int]]`: the buckets, ordered by height (from the widest landscape to the tallest portrait).
    """
    if multiple < 1 or resolution < multiple or resolution % multiple != 0:
        raise ValueError(f"resolution={resolution} must be a positive multiple of multiple={multiple}.")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be at least 1 (longest side over shortest).")
    landscape = []
    for height in range(multiple, resolution + 1, multiple):
        width = resolution**2 // (height * multiple) * multiple
        if width <= max_aspect_ratio * height:
            landscape.append((height, width))
    return sorted(set(landscape) | {(width, height) for height, width in landscape})


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to an image's, in log scale (3:2 is as far from 1:1 as 2:3 is).

    Ties go to the squarer bucket, then to the one listed first; ratios are compared exactly, as fractions, so the
    choice does not depend on floating-point rounding.

    Args:
        width (`int`), height (`int`): The image's size, in PIL's order (`image.size`).
        buckets (`Sequence[tuple[int, int]]`): `(height, width)` buckets, such as [`aspect_ratio_buckets`] returns.

    Returns:
        `tuple[int, int]`: the chosen `(height, width)` bucket.
    """
    if not buckets:
        raise ValueError("There are no buckets to choose from.")
    if width < 1 or height < 1:
        raise ValueError(f"An image of {width}x{height} pixels (width x height) has no aspect ratio.")

    def log_distance(a: Fraction, b: Fraction) -> Fraction:
        # exp(|log a - log b|), which orders like |log a - log b|.
        return max(a / b, b / a)

    ratio = Fraction(height, width)
    return min(
        buckets,
        key=lambda bucket: (
            log_distance(Fraction(*bucket), ratio),
            log_distance(Fraction(*bucket), Fraction(1)),
        ),
    )


def bucket_multiple(vae: AutoencoderKL | AutoencoderTiny, unet: ConditionalUNet) -> int:
    """The multiple of image sides that the VAE and the U-Net take without rounding: the VAE's scale factor times
    2 for every level of the U-Net that downsamples (all but the last).

    `ConditionalUNet` runs at any latent size, but an odd size at a level is rounded up by its downsampling and the
    decoder has to cut the upsampled features back; at multiples of this number every level exactly halves the one
    above, as in training at the square `resolution`. It is `vae_scale_factor * 2**num_upsamplers` of diffusers'
    `UNet2DConditionModel`, which takes the slower `upsample_size` path below it.
    """
    return vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)


def bucket_name(bucket: tuple[int, int]) -> str:
    """`"HxW"` for a `(height, width)` bucket, e.g. `"384x640"` for a landscape one: a key for logs and caches."""
    height, width = bucket
    return f"{height}x{width}"
