"""Robust image decoding: every image becomes 8-bit RGB, and unreadable or tiny images are found before training.

Web-scraped and user-made datasets hold grayscale, palette, transparent, CMYK and 16-bit images next to corrupt,
truncated and empty files. `datasets.Image` decodes lazily, so a bad file would crash training at whatever step
first touches it. `prepare_image_dataset` decodes every image once up front, drops the bad rows and reports how many
went; the training transform then decodes with the same `load_rgb`, so the two can never disagree.
"""

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

SkipReason = Literal["corrupt", "too small"]

# Modes holding more than 8 bits per sample; their full range is mapped onto 0..255 (PIL's own `convert` clips
# them at 255, which turns most of a 16-bit image white).
_16_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_rgb(image: Any, min_size: int = 8, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image | None:
    """Decodes an image into 8-bit RGB, or returns `None` when it cannot be used.

    Conversions: EXIF orientation is applied; grayscale (`1`, `L`), palette (`P`), `CMYK`, `YCbCr` and the like go
    through PIL's conversion; 16-bit (`I;16*`) and 32-bit integer (`I`) grayscale are scaled from 0..65535 to 0..255;
    transparent images (`RGBA`, `LA`, `PA`, `P` with transparency) are alpha-composited over `background`, black by
    default because the shapes dataset and most diffusion training sets of cut-out objects use a plain background
    and black is what a pixel with no light is.

    Args:
        image (`PIL.Image.Image`, `bytes`, `str` path, or `dict` with `"bytes"` and/or `"path"`):
            The last is what a `datasets.Image(decode=False)` column holds.
        min_size (`int`, defaults to 8): Images whose shorter side is below this many pixels are rejected.
        background (`tuple[int, int, int]`, defaults to black): RGB colour behind transparent pixels.

    Returns:
        `PIL.Image.Image` in mode `RGB`, fully loaded, or `None` if the image is corrupt, truncated, empty or smaller
        than `min_size`.
    """
    rgb, _ = decode_rgb(image, min_size=min_size, background=background)
    return rgb


def decode_rgb(
    image: Any, min_size: int = 8, background: tuple[int, int, int] = (0, 0, 0)
) -> tuple[Image.Image | None, SkipReason | None]:
    """Like `load_rgb`, but also says why an image was rejected: `(rgb, None)` or `(None, "corrupt" | "too small")`."""
    if image is None:  # a missing value in the image column
        return None, "corrupt"
    source = _image_source(image)
    try:
        pil = source if isinstance(source, Image.Image) else Image.open(source)
        pil.load()  # PIL opens lazily; truncated data only fails here
        pil = ImageOps.exif_transpose(pil)
        rgb = _to_rgb(pil, background)
    # PIL signals broken files with many exception types (UnidentifiedImageError, OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...); any failure to read or decode, a missing file included, marks the
    # image corrupt.
    except Exception:
        return None, "corrupt"
    if min(rgb.size) < min_size:
        return None, "too small"
    return rgb, None


def load_alpha(image: Any) -> Image.Image | None:
    """The alpha channel of a transparent image (mode `L`, oriented as `load_rgb` orients the image), or `None` for
    an opaque one (no alpha channel, no palette transparency). `image` is anything `load_rgb` reads, and must
    decode (check it with `load_rgb` first)."""
    pil = _image_source(image)
    pil = pil if isinstance(pil, Image.Image) else Image.open(pil)
    pil = ImageOps.exif_transpose(pil)
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (pil.mode == "P" and "transparency" in pil.info):
        return pil.convert("RGBA").getchannel("A")
    return None


@dataclass
class ImageReport:
    """What `prepare_image_dataset` dropped: counts of rows checked and skipped, by reason."""

    total: int
    corrupt: int = 0
    too_small: int = 0

    @property
    def skipped(self) -> int:
        return self.corrupt + self.too_small

    def __str__(self) -> str:
        return f"skipped {self.skipped} of {self.total} images ({self.corrupt} corrupt, {self.too_small} too small)"


def prepare_image_dataset(
    dataset: Dataset, image_column: str = "image", min_size: int = 8
) -> tuple[Dataset, ImageReport]:
    """Decodes every image once and drops the rows `load_rgb` rejects, so training never meets a bad image.

    Call it once before training. The image column is cast to `datasets.Image(decode=False)`, so that reading a row
    never decodes (and never raises); the training transform decodes with `load_rgb`.

    Args:
        dataset (`datasets.Dataset`): The training set.
        image_column (`str`, defaults to `"image"`): Column holding the images (a `datasets.Image` feature, file
            paths or encoded bytes).
        min_size (`int`, defaults to 8): Smallest accepted shorter side, in pixels.

    Returns:
        `(dataset, report)`: the dataset without the rejected rows, and an `ImageReport` of what was dropped
        (also logged).

    Raises:
        `ValueError`: if `image_column` is missing, or no usable image is left.
    """
    if image_column not in dataset.column_names:
        raise ValueError(
            f"image_column {image_column!r} not found in the dataset; available columns: {dataset.column_names}."
        )
    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))

    def skip_reasons(images: list[Any]) -> dict[str, list[str]]:
        return {"skip_reason": [decode_rgb(image, min_size=min_size)[1] or "" for image in images]}

    # Only the reason column is written, not a copy of the images; `map` caches it for datasets backed by files. It
    # runs in this process: datasets 5 starts a process pool for any num_proc, even 1.
    reasons = list(
        dataset.map(
            skip_reasons,
            input_columns=[image_column],
            batched=True,
            remove_columns=dataset.column_names,
            desc="Checking images",
        )["skip_reason"]
    )
    report = ImageReport(total=len(reasons), corrupt=reasons.count("corrupt"), too_small=reasons.count("too small"))
    if report.skipped:
        dataset = dataset.select([index for index, reason in enumerate(reasons) if not reason])
    logger.info(str(report))
    if len(dataset) == 0:
        raise ValueError(f"No usable image left in column {image_column!r} ({report}); min_size={min_size}.")
    return dataset, report


def _image_source(image: Any) -> Image.Image | io.BytesIO | str | os.PathLike:
    """What `Image.open` reads for each accepted kind of image value (a PIL image is returned as is)."""
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path") is not None):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, bytes):
        return io.BytesIO(image)
    if isinstance(image, Image.Image | str | os.PathLike):
        return image
    raise ValueError(
        f"Cannot read an image from {type(image).__name__}; expected a PIL image, bytes, a path, or a dict with "
        "'bytes' or 'path' (a datasets.Image(decode=False) value)."
    )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in _16_BIT_MODES:
        # 16-bit PNGs open as I;16 (or I in older Pillow): scale 0..65535 to 0..255, rounding to nearest.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        image = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
