"""Training-time preprocessing: resize, crop, optional flip, to a tensor in [-1, 1]; captions picked per use."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import load_alpha, load_rgb


class ImageTransform:
    """Decodes an image with `load_rgb`, resizes it so that it covers the output size (the shorter side becomes
    `resolution` for the default square), crops to that size, maybe flips it, and returns it as a float tensor in
    [-1, 1], the range the VAE encodes (as in diffusers' `train_text_to_image.py`).

    A `size` passed to a call, such as an aspect-ratio bucket (`latentddpm.buckets`), replaces the square.
    [`with_time_ids`] also returns where the crop came from, for SDXL's size and crop micro-conditioning.

    Args:
        resolution (`int`): Side of the output square, in pixels.
        center_crop (`bool`, defaults to `True`): Crop the centre; otherwise a random window, drawn from `generator`.
        random_flip (`bool`, defaults to `False`): Mirror left-right with probability 1/2. Off by default because it
            contradicts captions that name sides: on the shapes dataset it turns "a red square in the top left" into
            a red square in the top right.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        if resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution}.")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(
        self, image: Any, generator: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """
        Args:
            image (`PIL.Image.Image`, `bytes`, path, or `dict` with `"bytes"`/`"path"`): Anything `load_rgb` reads,
                such as a row of an image column after `prepare_image_dataset`.
            generator (`torch.Generator`, *optional*): Source of the random crop and flip; the global torch RNG if
                omitted (which `DataLoader` seeds differently in each worker).
            size (`tuple[int, int]`, *optional*): The output's `(height, width)`; `(resolution, resolution)` if
                omitted.

        Returns:
            `torch.Tensor` of shape (3, height, width), float32 in [-1, 1].
        """
        (pixels,), _ = self._transform([self._rgb(image)], generator, size)
        return pixels / 127.5 - 1.0

    def with_alpha(
        self, image: Any, generator: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like calling the transform (the same random draws, so the same crop and flip), and also the image's alpha
        channel through the same resize, crop and flip: all ones for an opaque image.

        Returns:
            `(pixels, alpha)`: `pixels` as `__call__` returns them, `alpha` of shape (1, height, width), float32 in
            [0, 1].
        """
        rgb = self._rgb(image)
        alpha = load_alpha(image)
        if alpha is None:
            alpha = Image.new("L", rgb.size, 255)
        (pixels, alpha), _ = self._transform([rgb, alpha.convert("RGB")], generator, size)
        return pixels / 127.5 - 1.0, alpha[:1] / 255.0

    def with_time_ids(
        self, image: Any, generator: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
        """Like calling the transform (the same random draws), and also the image's SDXL micro-conditioning: its
        size before the resize, the crop's top-left corner in the resized image, and the output size (Podell et
        al. 2023, section 2.2, https://arxiv.org/abs/2307.01952).

        Returns:
            `(pixels, time_ids)`: `pixels` as `__call__` returns them, and `time_ids` as SDXL orders them:
            `(original_height, original_width, crop_top, crop_left, height, width)`. After a flip, `crop_left` is
            the left edge of the flipped crop in the flipped resized image.
        """
        (pixels,), time_ids = self._transform([self._rgb(image)], generator, size)
        return pixels / 127.5 - 1.0, time_ids

    def crop_box(
        self,
        original_size: tuple[int, int],
        size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where an image of `original_size` is resized to, and where in it the crop of `size` starts.

        The resize keeps the aspect ratio and covers `size` (the shorter side of the square becomes `resolution`);
        the crop is centred, or drawn from `generator` (its left edge, then its top one).

        Args:
            original_size (`tuple[int, int]`): The image's `(height, width)`.
            size (`tuple[int, int]`, *optional*): The crop's `(height, width)`; `(resolution, resolution)` if omitted.
            generator (`torch.Generator`, *optional*): Source of a random crop.

        Returns:
            `(resized_size, (top, left))`, with `resized_size` as `(height, width)`.
        """
        height, width = size or (self.resolution, self.resolution)
        if height < 1 or width < 1:
            raise ValueError(f"size must be a positive (height, width), got {size}.")
        original_height, original_width = original_size
        scale = max(height / original_height, width / original_width)
        resized_height = max(height, round(original_height * scale))
        resized_width = max(width, round(original_width * scale))
        if self.center_crop:
            left, top = (resized_width - width) // 2, (resized_height - height) // 2
        else:
            left = int(torch.randint(0, resized_width - width + 1, (), generator=generator))
            top = int(torch.randint(0, resized_height - height + 1, (), generator=generator))
        return (resized_height, resized_width), (top, left)

    @staticmethod
    def _rgb(image: Any) -> Image.Image:
        # Size was checked by `prepare_image_dataset`; here only decoding matters.
        rgb = load_rgb(image, min_size=1)
        if rgb is None:
            raise ValueError(
                "An image cannot be decoded; filter the dataset with `prepare_image_dataset` before training."
            )
        return rgb

    def _transform(
        self, images: list[Image.Image], generator: torch.Generator | None, size: tuple[int, int] | None
    ) -> tuple[list[torch.Tensor], tuple[int, int, int, int, int, int]]:
        """One resize, crop and flip (one set of random draws) applied to same-sized RGB images; each comes back as a
        float tensor of shape (3, height, width) in [0, 255], with the SDXL time ids of [`with_time_ids`]."""
        original_width, original_height = images[0].size
        resized, (top, left) = self.crop_box((original_height, original_width), size, generator)
        resized_height, resized_width = resized
        if (resized_width, resized_height) != images[0].size:
            # PIL filters with a support that widens when downscaling, so this is antialiased like torchvision's
            # `Resize` on PIL images.
            images = [image.resize((resized_width, resized_height), Image.Resampling.BILINEAR) for image in images]
        height, width = size or (self.resolution, self.resolution)
        images = [image.crop((left, top, left + width, top + height)) for image in images]
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
            left = resized_width - left - width
        time_ids = (original_height, original_width, top, left, height, width)
        # (H, W, 3) -> (3, H, W)
        return [torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) for image in images], time_ids


def pick_caption(caption: str | Sequence[str], generator: torch.Generator | None = None) -> str:
    """The caption itself, or one drawn uniformly from a list of captions of the same image."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, Sequence) and len(caption) > 0 and all(isinstance(c, str) for c in caption):
        return caption[int(torch.randint(0, len(caption), (), generator=generator))]
    raise ValueError(f"A caption must be a string or a non-empty list of strings, got {caption!r}.")
