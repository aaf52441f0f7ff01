"""A pixel-rule judge for images of the shapes dataset: which colour, which shape, which position.

It needs no trained classifier, so it scores a text-to-image model trained on `latentddpm.data.shapes` by
checking each sample against its prompt:

1. foreground = pixels whose brightest channel is above half of the image's bright level (the background is black;
   a relative threshold keeps blurred edges where they were, and is blind to small noise);
2. the largest 4-connected foreground component is the shape (stray specks are ignored);
3. colour = nearest palette colour after dividing the mean RGB by its largest channel (brightness-free, so darker
   anti-aliased edges and a dimmer sample still match);
4. position = nearest of the 5 position centres to the component's centroid;
5. shape = the one of circle, square and apex-up triangle that, drawn as the dataset draws it with the component's
   area and centroid, overlaps the component best (intersection over union). Matching area and centroid rather than
   the bounding box keeps a few stray or missing edge pixels from deciding the shape.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.shapes import COLORS, POSITIONS, SHAPES, parse_shapes_caption, shape_coverage, shapes_prompts
from .sampling import generate_images, to_pil

# Images larger than this are box-downsampled first: the rules are scale-free and this bounds the cost.
WORKING_SIZE = 64
# Below this bright level (brightest channel, 99th percentile, in [0, 1]) the image counts as blank: every palette
# colour has a channel >= 150 / 255 ~ 0.59.
MIN_PEAK_BRIGHTNESS = 0.15

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)
_PALETTE /= _PALETTE.max(axis=1, keepdims=True)
# Area of each shape drawn by `shape_coverage` with half-size h, divided by h^2.
_AREA_PER_HALF_SIZE_SQUARED = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_POSITION_NAMES = list(POSITIONS)
_POSITION_CENTERS = np.array([POSITIONS[name] for name in _POSITION_NAMES], dtype=np.float64)

ImageLike = Image.Image | np.ndarray | torch.Tensor


def judge_image(image: ImageLike) -> dict[str, str | None]:
    """Reads colour, shape and position off one image.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` of shape (H, W, 3) or `torch.Tensor` of shape (3, H, W)):
            uint8 values in [0, 255] or float values in [0, 1] (values outside are clipped), as returned by a
            pipeline with `output_type="pil"`, `"np"` or `"pt"`.

    Returns:
        `dict` with keys `"color"`, `"shape"` and `"position"`, each a name from `COLORS`, `SHAPES` and `POSITIONS`,
        or all `None` when the image has no foreground.
    """
    pixels, mask = foreground(image)
    if mask is None:
        return {"color": None, "shape": None, "position": None}
    color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - mean_chroma(pixels, mask)) ** 2).sum(axis=1)))]
    position = nearest_position(mask)

    # Step 5 of the module docstring: draw each candidate with the component's area and centroid, keep the best IoU.
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    centroid_px = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    scores = []
    for shape in SHAPES:
        half_size = np.sqrt(area / _AREA_PER_HALF_SIZE_SQUARED[shape])
        # A triangle's centroid lies a third of the way up from its base, h / 3 below its bounding box centre.
        center = (centroid_px[0], centroid_px[1] - (half_size / 3 if shape == "triangle" else 0.0))
        scores.append(_soft_iou(mask, shape_coverage(shape, center, half_size, mask.shape)))
    shape = SHAPES[int(np.argmax(scores))]
    return {"color": color, "shape": shape, "position": position}


def foreground(image: ImageLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Steps 1 and 2 of the module docstring: the image and its shape's pixels.

    Args:
        image: Any image `judge_image` takes.

    Returns:
        `(pixels, mask)`: the image as float64 `np.ndarray` of shape (H, W, 3) in [0, 1] (at most `WORKING_SIZE` on
        its longer side), and the boolean (H, W) mask of its largest bright component, or `None` when the image is
        blank.
    """
    pixels = _to_float_rgb(image)
    brightness = pixels.max(axis=2)
    peak = float(np.percentile(brightness, 99))
    if peak < MIN_PEAK_BRIGHTNESS:
        return pixels, None
    return pixels, _largest_component(brightness > peak / 2)


def mean_chroma(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Step 3's brightness-free colour: the masked pixels' mean RGB divided by its largest channel, shape (3,)."""
    mean_rgb = pixels[mask].mean(axis=0)
    return mean_rgb / max(float(mean_rgb.max()), 1e-6)


def nearest_position(mask: np.ndarray) -> str:
    """Step 4: the name of the position centre nearest to the mask's centroid."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    centroid = np.array([(xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height])
    return _POSITION_NAMES[int(np.argmin(((_POSITION_CENTERS - centroid) ** 2).sum(axis=1)))]


def score_shapes(images: Sequence[ImageLike] | np.ndarray | torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Scores images against the shapes captions they were generated from.

    Args:
        images (list of images, `np.ndarray` of shape (B, H, W, 3) or `torch.Tensor` of shape (B, 3, H, W)):
            Images in any form `judge_image` takes.
        prompts (`list[str]`): One shapes caption per image, e.g. from `shapes_prompts()`.

    Returns:
        `dict` with `color_acc`, `shape_acc`, `position_acc` (fraction of images whose attribute matches the prompt),
        `all_acc` (fraction matching on all three) and `n` (number of images).
    """
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    if len(prompts) == 0:
        raise ValueError("score_shapes needs at least one image and prompt.")
    # Parse every prompt before judging anything, so a bad prompt fails fast.
    targets = [parse_shapes_caption(prompt) for prompt in prompts]  # (color, shape, position) each
    hits = np.zeros((len(prompts), 3))
    for row, (image, target) in enumerate(zip(images, targets)):
        judged = judge_image(image)
        hits[row] = [judged[key] == value for key, value in zip(("color", "shape", "position"), target)]
    color_acc, shape_acc, position_acc = hits.mean(axis=0).tolist()
    return {
        "color_acc": color_acc,
        "shape_acc": shape_acc,
        "position_acc": position_acc,
        "all_acc": float(hits.all(axis=1).mean()),
        "n": len(prompts),
    }


def score_shapes_prompts(
    pipeline, num_inference_steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 30
) -> tuple[dict[str, float], list[Image.Image]]:
    """Sample one image for each of the 90 `shapes_prompts()` with `generate_images` and score them.

    The judge reads the 8-bit PIL images, as a user of the pipeline sees them.

    Returns:
        `(scores, images)`: what `score_shapes` returns, and the images in prompt order.
    """
    prompts = shapes_prompts()
    images = to_pil(generate_images(pipeline, prompts, num_inference_steps, guidance_scale, seed, batch_size))
    return score_shapes(images, prompts), images


def _to_float_rgb(image: ImageLike) -> np.ndarray:
    """Any accepted image -> float64 array of shape (H, W, 3) in [0, 1], at most WORKING_SIZE on its longer side."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"A tensor image must have shape (3, H, W), got {tuple(image.shape)}.")
        image = image.detach().cpu().permute(1, 2, 0)
        array = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"An array image must have shape (H, W, 3), got {image.shape}.")
        array = image
    else:
        raise ValueError(
            f"Unsupported image type {type(image).__name__}; expected PIL.Image.Image, np.ndarray or torch.Tensor."
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255
    else:
        array = np.clip(array.astype(np.float64), 0.0, 1.0)
    height, width = array.shape[:2]
    if max(height, width) > WORKING_SIZE:
        scale = WORKING_SIZE / max(height, width)
        small = Image.fromarray(np.rint(array * 255).astype(np.uint8)).resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
        )
        array = np.asarray(small, dtype=np.float64) / 255
    return array


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask.

    Label propagation: every foreground pixel starts with its own index as label and repeatedly takes the smallest
    label among itself and its 4 neighbours, then the label of the pixel that label names (pointer jumping, so the
    number of rounds grows with the log of the component's length, not the length), until nothing changes.
    """
    height, width = mask.shape
    background = height * width
    labels = np.where(mask, np.arange(height * width).reshape(height, width), background)
    while True:
        padded = np.pad(labels, 1, constant_values=background)
        smallest = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        smallest = np.where(mask, smallest, background)
        smallest[mask] = smallest.ravel()[smallest[mask]]
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    counts = np.bincount(labels[mask])
    return mask & (labels == counts.argmax())


def _soft_iou(mask: np.ndarray, coverage: np.ndarray) -> float:
    return float(np.minimum(mask, coverage).sum() / np.maximum(mask, coverage).sum())
