"""The embedded "shapes" dataset: one coloured shape on a black background, captioned by what and where it is.

Every image shows one filled shape of one of 6 colours and 3 kinds at one of 5 positions, and its caption says
exactly that: "a red triangle in the top left". The 6 * 3 * 5 = 90 captions are the whole prompt space, so a
model's samples can be scored by rule (`latentddpm.eval.shapes_judge`), and combinations left out of training
(`DEFAULT_HOLDOUT`) test whether it composes attributes it has only seen apart.

The images are generated here from a seed, so the dataset needs no download and the same seed gives the same bytes.
"""

import re
from collections.abc import Iterable

import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

# Palette in sRGB. Each colour has a channel >= 150 so the shape stands well above the black background, and the
# colours differ in hue (not only brightness), so they stay apart after normalizing away brightness.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
# "triangle" is isosceles with its apex up: the vertex at the top, the base at the bottom.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Centre (x, y) of each position as fractions of the image side, y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Size and jitter as fractions of the image side: half-size (centre to edge) and the largest shift of the centre.
MIN_HALF_SIZE = 5 / 32
MAX_HALF_SIZE = 7 / 32
MAX_JITTER = 1 / 16
# Shapes are drawn on a grid this many times finer and box-filtered down, so edges are anti-aliased the same way at
# every size (a hard-edged 32x32 circle is a jagged octagon).
SUPERSAMPLING = 4

# One example held out per colour, each shape twice, every position at least once, so that every colour, shape and
# position, and every (colour, shape), (colour, position) and (shape, position) pair, still appears in training.
DEFAULT_HOLDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "center"),
    ("green", "circle", "top left"),
    ("blue", "square", "bottom right"),
    ("yellow", "triangle", "top right"),
    ("purple", "circle", "bottom left"),
    ("cyan", "square", "center"),
)

_CAPTION_RE = re.compile(
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) in the ({'|'.join(POSITIONS)})",
    flags=re.IGNORECASE,
)


def shapes_caption(color: str, shape: str, position: str) -> str:
    """The caption of one combination: `"a {color} {shape} in the {position}"`."""
    _check_combination(color, shape, position)
    return f"a {color} {shape} in the {position}"


def parse_shapes_caption(caption: str) -> tuple[str, str, str]:
    """Inverse of `shapes_caption`: `"a red triangle in the top left"` -> `("red", "triangle", "top left")`.

    Case and surrounding whitespace are ignored. Raises `ValueError` on any other text.
    """
    match = _CAPTION_RE.fullmatch(caption.strip())
    if match is None:
        raise ValueError(
            f"{caption!r} is not a shapes caption: expected 'a {{color}} {{shape}} in the {{position}}' with color in "
            f"{list(COLORS)}, shape in {list(SHAPES)} and position in {list(POSITIONS)}."
        )
    color, shape, position = (group.lower() for group in match.groups())
    return color, shape, position


def shapes_combinations() -> list[tuple[str, str, str]]:
    """All 90 `(color, shape, position)` combinations, colour-major, in the orders of `COLORS`, `SHAPES` and
    `POSITIONS`."""
    return [(color, shape, position) for color in COLORS for shape in SHAPES for position in POSITIONS]


def shapes_prompts() -> list[str]:
    """The captions of all 90 combinations, in the fixed order of `shapes_combinations()`."""
    return [shapes_caption(*combination) for combination in shapes_combinations()]


def render_shape(
    color: str, shape: str, position: str, size: int = 32, rng: np.random.Generator | None = None
) -> PILImage.Image:
    """Draws one filled shape on a black square image.

    Args:
        color (`str`): One of `COLORS`.
        shape (`str`): One of `SHAPES`.
        position (`str`): One of `POSITIONS`.
        size (`int`, defaults to 32): Side of the image in pixels.
        rng (`np.random.Generator`, *optional*):
            Draws the half-size (uniform in [5/32, 7/32] of the side) and the jitter of the centre (uniform in
            +-1/16 of the side on each axis). Without it the shape is centred exactly, with half-size 6/32.

    Returns:
        `PIL.Image.Image`: An RGB image of `size` x `size` pixels.
    """
    _check_combination(color, shape, position)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels to draw a recognisable shape, got {size}.")
    center_x, center_y = (fraction * size for fraction in POSITIONS[position])
    if rng is None:
        half_size = (MIN_HALF_SIZE + MAX_HALF_SIZE) / 2 * size
    else:
        half_size = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE) * size
        center_x, center_y = (c + rng.uniform(-MAX_JITTER, MAX_JITTER) * size for c in (center_x, center_y))
    # A shape cut by the border would no longer look like its kind, so the jitter never pushes it off the image.
    center_x, center_y = (float(np.clip(c, half_size, size - half_size)) for c in (center_x, center_y))

    coverage = shape_coverage(shape, (center_x, center_y), half_size, (size, size))
    pixels = np.rint(coverage[..., None] * np.array(COLORS[color], dtype=np.float64)).astype(np.uint8)
    return PILImage.fromarray(pixels, mode="RGB")


def shape_coverage(
    shape: str, center: tuple[float, float], half_size: float, image_size: tuple[int, int]
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, estimated on a `SUPERSAMPLING` x `SUPERSAMPLING` grid per pixel.

    Args:
        shape (`str`): One of `SHAPES`.
        center (`tuple[float, float]`): Centre (x, y) of the shape's bounding box, in pixels from the top left corner.
        half_size (`float`): Half the side of the bounding box, in pixels.
        image_size (`tuple[int, int]`): (height, width) of the image.

    Returns:
        `np.ndarray` of shape (height, width), float64 values in [0, 1].
    """
    height, width = image_size
    # Sample points at the centres of the sub-pixels, in pixel units.
    dx = (np.arange(width * SUPERSAMPLING) + 0.5)[None, :] / SUPERSAMPLING - center[0]
    dy = (np.arange(height * SUPERSAMPLING) + 0.5)[:, None] / SUPERSAMPLING - center[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= half_size**2
    elif shape == "square":
        inside = (np.abs(dx) <= half_size) & (np.abs(dy) <= half_size)
    elif shape == "triangle":
        # Apex at dy = -half_size, base of width 2 * half_size at dy = +half_size: the half-width grows linearly.
        inside = (dy <= half_size) & (np.abs(dx) <= (dy + half_size) / 2)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")
    return inside.reshape(height, SUPERSAMPLING, width, SUPERSAMPLING).mean(axis=(1, 3))


def make_shapes_dataset(
    num_images: int,
    size: int = 32,
    seed: int = 0,
    holdout: Iterable[tuple[str, str, str] | str] = (),
) -> Dataset:
    """Generates the shapes dataset.

    The combinations not held out are used in turn, each round in a new random order, so every combination appears
    `num_images // len(combinations)` or one more times.

    Args:
        num_images (`int`): Number of images.
        size (`int`, defaults to 32): Side of every image in pixels.
        seed (`int`, defaults to 0): Seeds the order of combinations, the sizes and the jitter; the same seed gives
            byte-identical images.
        holdout (iterable of `(color, shape, position)` tuples or captions, defaults to `()`):
            Combinations that never appear, e.g. `DEFAULT_HOLDOUT`.

    Returns:
        `datasets.Dataset` with columns `image` (`datasets.Image`, PNG), `text` (the caption), `color`, `shape` and
        `position`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images}.")
    held_out = {parse_shapes_caption(c) if isinstance(c, str) else tuple(c) for c in holdout}
    for combination in held_out:
        _check_combination(*combination)
    combinations = [c for c in shapes_combinations() if c not in held_out]
    if not combinations:
        raise ValueError("holdout removes all 90 combinations of the shapes dataset; nothing is left to train on.")

    rng = np.random.default_rng(seed)
    rounds = -(-num_images // len(combinations))
    order = np.concatenate([rng.permutation(len(combinations)) for _ in range(rounds)])[:num_images]
    rows = {"image": [], "text": [], "color": [], "shape": [], "position": []}
    for index in order:
        color, shape, position = combinations[index]
        rows["image"].append(render_shape(color, shape, position, size=size, rng=rng))
        rows["text"].append(shapes_caption(color, shape, position))
        rows["color"].append(color)
        rows["shape"].append(shape)
        rows["position"].append(position)
    features = Features({"image": Image(), **{column: Value("string") for column in rows if column != "image"}})
    return Dataset.from_dict(rows, features=features)


def _check_combination(color: str, shape: str, position: str) -> None:
    for name, value, allowed in (
        ("color", color, COLORS),
        ("shape", shape, SHAPES),
        ("position", position, POSITIONS),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")
