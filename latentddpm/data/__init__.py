"""Training data: the embedded shapes dataset, image-caption sources, robust decoding and transforms."""

from .images import ImageReport, decode_rgb, load_rgb, prepare_image_dataset
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
    "POSITIONS",
    "SHAPES",
    "ImageReport",
    "ImageTransform",
    "decode_rgb",
    "load_image_caption_dataset",
    "load_rgb",
    "make_shapes_dataset",
    "parse_shapes_caption",
    "pick_caption",
    "prepare_image_dataset",
    "render_shape",
    "shape_coverage",
    "shapes_caption",
    "shapes_combinations",
    "shapes_prompts",
]
