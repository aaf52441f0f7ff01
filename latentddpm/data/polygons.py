"""The embedded "polygons" dataset: a broad synthetic distribution for training a general stage-1 autoencoder.

The shapes dataset (`latentddpm.data.shapes`) has 3 shapes in 6 colours at 5 places: an autoencoder trained on it
alone learns exactly those and cannot represent anything else (an orange star decodes as a yellowish rounded
pentagon). A stage-1 autoencoder should be a general compressor, as LDM's are (Rombach et al. 2022, sec. 3), so
this dataset draws one or two filled polygons per image on black, each of a random colour, size, position and kind:

- `"star"`: 3 to 8 points, random inner-to-outer radius ratio and rotation (concave);
- `"convex polygon"`: the convex hull of random points on a circle;
- `"concave polygon"`: a star-shaped polygon with a random radius at each vertex;

and a fraction `shapes_fraction` of the images are the shapes dataset's own, so the domain the diffusion model is
trained on stays well covered. Colours near `HELDOUT_COLORS` are never drawn, so reconstructions of, say, an orange
star measure what the autoencoder generalises to rather than what it memorised.

The images are generated here from a seed: the same seed gives the same bytes.
"""

import colorsys

import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from .shapes import SUPERSAMPLING, make_shapes_dataset

# Colours the random draws stay away from (by Euclidean RGB distance), so they can test generalisation.
HELDOUT_COLORS: dict[str, tuple[int, int, int]] = {"orange": (255, 140, 0)}
MIN_HELDOUT_COLOR_DISTANCE = 48.0
# Random colours have a channel at least this bright, so every polygon stands above the black background.
MIN_PEAK_CHANNEL = 80
POLYGON_KINDS: tuple[str, ...] = ("star", "convex polygon", "concave polygon")
# Outer radius (centre to farthest vertex) as fractions of the image side: from 2 px to 12 px at 32 x 32.
MIN_RADIUS = 1 / 16
MAX_RADIUS = 3 / 8
# The inner radius of a regular five-pointed star (pentagram) over its outer radius: sin(18 deg) / sin(54 deg).
PENTAGRAM_INNER_RATIO = float(np.sin(np.pi / 10) / np.sin(3 * np.pi / 10))


def star_vertices(
    center: tuple[float, float],
    outer_radius: float,
    points: int = 5,
    inner_ratio: float = PENTAGRAM_INNER_RATIO,
    rotation: float = 0.0,
) -> np.ndarray:
    """Vertices of a star polygon, alternating between the outer and the inner radius.

    Args:
        center (`tuple[float, float]`): Centre (x, y) in pixels from the top left corner, y pointing down.
        outer_radius (`float`): Distance from the centre to each point, in pixels.
        points (`int`, defaults to 5): Number of points (at least 3).
        inner_ratio (`float`, defaults to `PENTAGRAM_INNER_RATIO`): Inner radius over outer radius, in (0, 1);
            the default gives the regular pentagram's outline.
        rotation (`float`, defaults to 0): Angle in radians, clockwise on screen, of the first point from straight up.

    Returns:
        `np.ndarray` of shape (2 * points, 2): the (x, y) vertices in drawing order.
    """
    if points < 3:
        raise ValueError(f"A star needs at least 3 points, got {points}.")
    if not 0 < inner_ratio < 1:
        raise ValueError(f"inner_ratio must be in (0, 1), got {inner_ratio}.")
    angles = rotation - np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer_radius, outer_radius * inner_ratio)
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)


def polygon_coverage(vertices: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Fraction of each pixel covered by a filled polygon, on a `SUPERSAMPLING` x `SUPERSAMPLING` grid per pixel
    (the same anti-aliasing as the shapes dataset).

    Args:
        vertices (`np.ndarray` of shape (N, 2)): (x, y) vertices in pixels from the top left corner.
        image_size (`tuple[int, int]`): (height, width) of the image.

    Returns:
        `np.ndarray` of shape (height, width), float64 values in [0, 1].
    """
    height, width = image_size
    vertices = np.asarray(vertices, dtype=np.float64)
    # Only the sub-pixels of the pixels the polygon's bounding box touches can be inside.
    left, top = np.clip(np.floor(vertices.min(axis=0)).astype(int), 0, [width, height])
    right, bottom = np.clip(np.ceil(vertices.max(axis=0)).astype(int), [left, top], [width, height])
    # Sample points at the centres of the sub-pixels, in pixel units.
    x = (np.arange(left * SUPERSAMPLING, right * SUPERSAMPLING) + 0.5)[None, :] / SUPERSAMPLING
    y = (np.arange(top * SUPERSAMPLING, bottom * SUPERSAMPLING) + 0.5)[:, None] / SUPERSAMPLING
    # Even-odd rule: a point is inside when a ray from it to the right crosses the outline an odd number of times.
    inside = np.zeros((y.size, x.size), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        straddles = (y0 > y) != (y1 > y)  # (rows, 1): the edge spans the row; never when it is horizontal
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = x0 + (y - y0) * (x1 - x0) / (y1 - y0)  # where the edge meets the row
        inside ^= straddles & (x < crossing)
    coverage = np.zeros((height, width))
    cells = inside.reshape(bottom - top, SUPERSAMPLING, right - left, SUPERSAMPLING)
    coverage[top:bottom, left:right] = cells.mean(axis=(1, 3))
    return coverage


def render_polygons(polygons: list[tuple[np.ndarray, tuple[int, int, int]]], size: int = 32) -> PILImage.Image:
    """Draws filled polygons on a black square image, later ones over earlier ones.

    Args:
        polygons (list of `(vertices, color)`): vertices as `polygon_coverage` takes them, colours as sRGB triples.
        size (`int`, defaults to 32): Side of the image in pixels.

    Returns:
        `PIL.Image.Image`: An RGB image of `size` x `size` pixels.
    """
    pixels = np.zeros((size, size, 3))
    for vertices, color in polygons:
        coverage = polygon_coverage(vertices, (size, size))[..., None]
        pixels = pixels * (1 - coverage) + coverage * np.array(color, dtype=np.float64)
    return PILImage.fromarray(np.rint(pixels).astype(np.uint8), mode="RGB")


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random sRGB colour of uniform hue, at least `MIN_HELDOUT_COLOR_DISTANCE` from every `HELDOUT_COLORS` entry
    (rejection sampling).

    Saturation and value are drawn with density 2x on [0, 1] (value then mapped to [`MIN_PEAK_CHANNEL` / 255, 1]), so
    vivid colours, such as the shapes palette's and those at the edges of the RGB cube, are common: uniform RGB rarely
    draws a colour with one channel near 255 and another near 0, and an autoencoder trained on it renders them grey.
    """
    heldout = np.array(list(HELDOUT_COLORS.values()), dtype=np.float64)
    while True:
        hue, saturation, value = rng.uniform(size=3)
        value = MIN_PEAK_CHANNEL / 255 + (1 - MIN_PEAK_CHANNEL / 255) * np.sqrt(value)
        color = np.rint(np.array(colorsys.hsv_to_rgb(hue, np.sqrt(saturation), value)) * 255)
        if np.linalg.norm(heldout - color, axis=1).min() >= MIN_HELDOUT_COLOR_DISTANCE:
            return tuple(int(c) for c in color)


def random_polygon(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a random polygon of `kind` (one of `POLYGON_KINDS`) that lies inside a `size`-pixel image."""
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size
    center = tuple(rng.uniform(radius, size - radius, size=2))
    rotation = rng.uniform(0, 2 * np.pi)
    if kind == "star":
        return star_vertices(center, radius, int(rng.integers(3, 9)), rng.uniform(0.25, 0.7), rotation)
    if kind == "convex polygon":
        # Points on a circle, in angular order, are the vertices of their own convex hull.
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 9))))
        radii = np.full_like(angles, radius)
    elif kind == "concave polygon":
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 11))))
        radii = radius * rng.uniform(0.3, 1.0, size=angles.shape)
    else:
        raise ValueError(f"Unknown polygon kind {kind!r}; expected one of {list(POLYGON_KINDS)}.")
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)


def make_polygons_dataset(
    num_images: int, size: int = 32, seed: int = 0, shapes_fraction: float = 0.25, **shapes_kwargs
) -> Dataset:
    """Generates the polygons dataset.

    Args:
        num_images (`int`): Number of images.
        size (`int`, defaults to 32): Side of every image in pixels.
        seed (`int`, defaults to 0): Seeds every draw; the same seed gives byte-identical images.
        shapes_fraction (`float`, defaults to 0.25): Fraction of the images (rounded down) taken from
            `make_shapes_dataset`, spread evenly through the dataset.
        shapes_kwargs: Further arguments of `make_shapes_dataset` (`holdout`).

    Returns:
        `datasets.Dataset` with columns `image` (`datasets.Image`, PNG) and `text` (the shapes caption, or the kinds
        of the polygons drawn, e.g. `"a star and a concave polygon"`).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images}.")
    if not 0 <= shapes_fraction <= 1:
        raise ValueError(f"shapes_fraction must be in [0, 1], got {shapes_fraction}.")
    num_shapes = int(num_images * shapes_fraction)
    shapes = make_shapes_dataset(num_shapes, size=size, seed=seed, **shapes_kwargs) if num_shapes else None
    # Shapes images at evenly spaced rows, so any prefix of the dataset holds about the same fraction.
    shapes_rows = set(np.floor(np.arange(num_shapes) * num_images / max(num_shapes, 1)).astype(int).tolist())
    rng = np.random.default_rng([seed, 1])  # a stream apart from the shapes dataset's own
    rows = {"image": [], "text": []}
    next_shape = 0
    for row in range(num_images):
        if row in shapes_rows:
            example = shapes[next_shape]
            rows["image"].append(example["image"])
            rows["text"].append(example["text"])
            next_shape += 1
            continue
        kinds = [POLYGON_KINDS[int(k)] for k in rng.integers(0, len(POLYGON_KINDS), size=int(rng.integers(1, 3)))]
        polygons = [(random_polygon(kind, size, rng), random_color(rng)) for kind in kinds]
        rows["image"].append(render_polygons(polygons, size))
        rows["text"].append(" and ".join(f"a {kind}" for kind in kinds))
    return Dataset.from_dict(rows, features=Features({"image": Image(), "text": Value("string")}))
