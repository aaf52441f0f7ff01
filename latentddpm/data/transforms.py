"""Training-time preprocessing: resize, crop, optional flip, to a tensor in [-1, 1]; captions picked per use."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import load_alpha, load_rgb


class ImageTransform:
    """Decodes an image with `load_rgb`, resizes it so its shorter side is `resolution`, crops a `resolution` square,
    maybe flips it, and returns it as a float tensor in [-1, 1], the range the VAE encodes (as in diffusers'
    `train_text_to_image.py`).

    Args:
        resolution (`int`): Side of the output square, in pixels.
        center_crop (`bool`, defaults to `True`): Crop the centre; otherwise a random square, drawn from `generator`.
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

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Args:
            image (`PIL.Image.Image`, `bytes`, path, or `dict` with `"bytes"`/`"path"`): Anything `load_rgb` reads,
                such as a row of an image column after `prepare_image_dataset`.
            generator (`torch.Generator`, *optional*): Source of the random crop and flip; the global torch RNG if
                omitted (which `DataLoader` seeds differently in each worker).

        Returns:
            `torch.Tensor` of shape (3, resolution, resolution), float32 in [-1, 1].
        """
        (pixels,) = self._transform([self._rgb(image)], generator)
        return pixels / 127.5 - 1.0

    def with_alpha(self, image: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like calling the transform (the same random draws, so the same crop and flip), and also the image's alpha
        channel through the same resize, crop and flip: all ones for an opaque image.

        Returns:
            `(pixels, alpha)`: `pixels` as `__call__` returns them, `alpha` of shape (1, resolution, resolution),
            float32 in [0, 1].
        """
        rgb = self._rgb(image)
        alpha = load_alpha(image)
        if alpha is None:
            alpha = Image.new("L", rgb.size, 255)
        pixels, alpha = self._transform([rgb, alpha.convert("RGB")], generator)
        return pixels / 127.5 - 1.0, alpha[:1] / 255.0

    @staticmethod
    def _rgb(image: Any) -> Image.Image:
        # Size was checked by `prepare_image_dataset`; here only decoding matters.
        rgb = load_rgb(image, min_size=1)
        if rgb is None:
            raise ValueError(
                "An image cannot be decoded; filter the dataset with `prepare_image_dataset` before training."
            )
        return rgb

    def _transform(self, images: list[Image.Image], generator: torch.Generator | None) -> list[torch.Tensor]:
        """One resize, crop and flip (one set of random draws) applied to same-sized RGB images; each comes back as a
        float tensor of shape (3, resolution, resolution) in [0, 255]."""
        width, height = images[0].size
        scale = self.resolution / min(width, height)
        new_size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if new_size != images[0].size:
            # PIL filters with a support that widens when downscaling, so this is antialiased like torchvision's
            # `Resize` on PIL images.
            images = [image.resize(new_size, Image.Resampling.BILINEAR) for image in images]

        width, height = new_size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left = int(torch.randint(0, width - self.resolution + 1, (), generator=generator))
            top = int(torch.randint(0, height - self.resolution + 1, (), generator=generator))
        images = [image.crop((left, top, left + self.resolution, top + self.resolution)) for image in images]
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
        # (H, W, 3) -> (3, H, W)
        return [torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) for image in images]


def pick_caption(caption: str | Sequence[str], generator: torch.Generator | None = None) -> str:
    """The caption itself, or one drawn uniformly from a list of captions of the same image."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, Sequence) and len(caption) > 0 and all(isinstance(c, str) for c in caption):
        return caption[int(torch.randint(0, len(caption), (), generator=generator))]
    raise ValueError(f"A caption must be a string or a non-empty list of strings, got {caption!r}.")
