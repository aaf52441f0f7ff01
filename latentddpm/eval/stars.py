"""A pixel-rule judge for stars: is there a star of a given colour at a given place?

It extends the shapes judge (`latentddpm.eval.shapes_judge`) to a shape outside the shapes dataset, for measuring
what an autoencoder or a fine-tune does with a concept the base never saw (an orange five-pointed star):

1. the star's pixels are the largest bright component, as the shapes judge finds them (`foreground`);
2. its outline's **solidity** = its area / the area of its convex hull (the hull of the pixels' corners, so it is at
   most 1). A convex shape (circle, square, triangle, pentagon) measures close to 1; a regular five-pointed star's
   outline 2 k sin(36 deg) / sin(72 deg) ~ 0.47 in the continuum (k = `PENTAGRAM_INNER_RATIO`), and ~0.6 when drawn
   16 px across, where anti-aliasing fills its notches. A star is what measures below `MAX_STAR_SOLIDITY`;
3. colour = the nearest of the shapes palette and `HELDOUT_COLORS` (orange) after dividing the mean RGB by its largest
   channel, as the shapes judge does; `color_distance` is that normalised mean's distance to the star's colour, in
   sRGB units (0-255);
4. position = the nearest of the shapes dataset's 5 position centres.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.spatial import ConvexHull

from ..data.polygons import HELDOUT_COLORS, render_polygons, star_vertices
from ..data.shapes import COLORS, POSITIONS
from .shapes_judge import ImageLike, foreground, mean_chroma, nearest_position

STAR_COLOR_NAME = "orange"
# Between a drawn star (~0.6 at 16 px) and a convex shape (> 0.9 at the same size, rounded or not).
MAX_STAR_SOLIDITY = 0.8

_PALETTE = {**COLORS, **HELDOUT_COLORS}
_PALETTE_NAMES = list(_PALETTE)
_PALETTE_CHROMA = np.array([_PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float64)
_PALETTE_CHROMA /= _PALETTE_CHROMA.max(axis=1, keepdims=True)


def render_star(
    position: str,
    diameter: float,
    size: int = 32,
    color: tuple[int, int, int] = HELDOUT_COLORS[STAR_COLOR_NAME],
    offset: tuple[float, float] = (0.0, 0.0),
    rotation: float = 0.0,
) -> Image.Image:
    """A regular five-pointed star, point up, on black: the held-out test image.

    Args:
        position (`str`): One of the shapes dataset's `POSITIONS`; the star's centre is that position's centre.
        diameter (`float`): Twice the outer radius, in pixels.
        size (`int`, defaults to 32): Side of the image in pixels.
        color (`tuple[int, int, int]`, defaults to orange (255, 140, 0)): sRGB fill.
        offset (`tuple[float, float]`, defaults to (0, 0)): Shift (x, y) of the centre, in pixels.
        rotation (`float`, defaults to 0): Clockwise rotation in radians.
    """
    if position not in POSITIONS:
        raise ValueError(f"Unknown position {position!r}; expected one of {list(POSITIONS)}.")
    center = tuple(fraction * size + shift for fraction, shift in zip(POSITIONS[position], offset))
    return render_polygons([(star_vertices(center, diameter / 2, rotation=rotation), color)], size)


def outline_solidity(mask: np.ndarray) -> float:
    """Area of a boolean (H, W) mask over the area of the convex hull of its pixels' corners, in (0, 1]."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("outline_solidity needs a mask with at least one pixel.")
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return float(len(xs) / ConvexHull(corners).volume)  # in 2-D, scipy's "volume" is the area


def judge_star(image: ImageLike, position: str, color: str = STAR_COLOR_NAME) -> dict:
    """Reads one image against "a `color` star in the `position`".

    Args:
        image: Any image the shapes judge takes (PIL, `np.ndarray` (H, W, 3) or `torch.Tensor` (3, H, W)).
        position (`str`): The expected position, one of `POSITIONS`.
        color (`str`, defaults to `"orange"`): The expected colour, a name from the shapes palette or
            `HELDOUT_COLORS`.

    Returns:
        `dict` with `solidity`, `color_distance` (floats, `None` for a blank image), `color` and `position` (the names
        read off the image, `None` for a blank image), and the booleans `concave` (solidity below
        `MAX_STAR_SOLIDITY`), `color_ok`, `position_ok` and `star_ok` (all three).
    """
    if position not in POSITIONS:
        raise ValueError(f"Unknown position {position!r}; expected one of {list(POSITIONS)}.")
    if color not in _PALETTE:
        raise ValueError(f"Unknown color {color!r}; expected one of {_PALETTE_NAMES}.")
    pixels, mask = foreground(image)
    if mask is None:
        judged = {"solidity": None, "color_distance": None, "color": None, "position": None, "concave": False}
    else:
        chroma = mean_chroma(pixels, mask)
        target = _PALETTE_CHROMA[_PALETTE_NAMES.index(color)]
        solidity = outline_solidity(mask)
        judged = {
            "solidity": solidity,
            "color_distance": float(np.linalg.norm(chroma - target) * 255),
            "color": _PALETTE_NAMES[int(np.argmin(((_PALETTE_CHROMA - chroma) ** 2).sum(axis=1)))],
            "position": nearest_position(mask),
            "concave": solidity < MAX_STAR_SOLIDITY,
        }
    judged["color_ok"] = judged["color"] == color
    judged["position_ok"] = judged["position"] == position
    judged["star_ok"] = judged["concave"] and judged["color_ok"] and judged["position_ok"]
    return judged


def score_stars(images: Sequence[ImageLike], positions: Sequence[str], color: str = STAR_COLOR_NAME) -> dict:
    """`judge_star` over a batch: the fraction of images that are concave, of the right colour, at the right place,
    and all three (`concave_acc`, `color_acc`, `position_acc`, `star_acc`), the mean `solidity` and `color_distance`
    over non-blank images, and `n`."""
    if len(images) != len(positions):
        raise ValueError(f"Got {len(images)} images but {len(positions)} positions; pass one position per image.")
    if len(images) == 0:
        raise ValueError("score_stars needs at least one image.")
    judged = [judge_star(image, position, color) for image, position in zip(images, positions)]
    checks = {"concave_acc": "concave", "color_acc": "color_ok", "position_acc": "position_ok", "star_acc": "star_ok"}
    scores = {name: float(np.mean([j[key] for j in judged])) for name, key in checks.items()}
    for key in ("solidity", "color_distance"):
        values = [j[key] for j in judged if j[key] is not None]
        scores[key] = float(np.mean(values)) if values else None
    return scores | {"n": len(judged)}
