"""Training data: the embedded shapes and polygons datasets, image-caption sources, robust decoding and transforms."""

from .images import ImageReport, decode_rgb, load_rgb, prepare_image_dataset
from .polygons import HELDOUT_COLORS, make_polygons_dataset, polygon_coverage, render_polygons, star_vertices
from .shapes import (
    COLORS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    SHAPES,
    make_shapes_dataset,
    parse_shapes_caption,
    render_shape,
    shape_coverage,
    shapes_caption,
    shapes_combinations,
    shapes_prompts,
)
from .sources import load_image_caption_dataset
from .transforms import ImageTransform, pick_caption

__all__ = [
    "COLORS",
    "DEFAULT_HOLDOUT",
    "HELDOUT_COLORS",
    "POSITIONS",
    "SHAPES",
    "ImageReport",
    "ImageTransform",
    "decode_rgb",
    "load_image_caption_dataset",
    "load_rgb",
    "make_polygons_dataset",
    "make_shapes_dataset",
    "parse_shapes_caption",
    "pick_caption",
    "polygon_coverage",
    "prepare_image_dataset",
    "render_polygons",
    "render_shape",
    "shape_coverage",
    "shapes_caption",
    "shapes_combinations",
    "shapes_prompts",
    "star_vertices",
]
