import numpy as np
import pytest

from latentddpm.config import DataConfig
from latentddpm.data.polygons import (
    HELDOUT_COLORS,
    MIN_HELDOUT_COLOR_DISTANCE,
    PENTAGRAM_INNER_RATIO,
    make_polygons_dataset,
    polygon_coverage,
    random_color,
    star_vertices,
)
from latentddpm.data.shapes import make_shapes_dataset, shapes_prompts
from latentddpm.data.sources import load_image_caption_dataset


def shoelace_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_star_vertices_alternate_outer_and_inner_radius_first_point_up():
    vertices = star_vertices((10.0, 20.0), 8.0, points=5)
    radii = np.linalg.norm(vertices - [10.0, 20.0], axis=1)
    np.testing.assert_allclose(radii, [8.0, 8.0 * PENTAGRAM_INNER_RATIO] * 5)
    np.testing.assert_allclose(vertices[0], [10.0, 12.0])  # straight up: y points down
    # The pentagram's inner vertices lie on the lines between every second outer point (its defining property).
    a, b = vertices[0], vertices[4]
    inner = vertices[1]
    assert abs(np.cross(b - a, inner - a)) < 1e-9


def test_polygon_coverage_area_and_centroid_match_the_closed_forms():
    vertices = star_vertices((16.3, 15.8), 12.0, points=7, inner_ratio=0.5, rotation=0.3)
    coverage = polygon_coverage(vertices, (32, 32))
    assert coverage.sum() == pytest.approx(shoelace_area(vertices), rel=0.005)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5  # pixel centres
    centroid = [(coverage * xs).sum() / coverage.sum(), (coverage * ys).sum() / coverage.sum()]
    np.testing.assert_allclose(centroid, [16.3, 15.8], atol=0.05)  # a regular star's centroid is its centre
    # An axis-aligned rectangle on pixel edges covers whole pixels; off the image it covers nothing.
    rectangle = np.array([[4.0, 4.0], [20.0, 4.0], [20.0, 12.0], [4.0, 12.0]])
    assert np.array_equal(polygon_coverage(rectangle, (32, 32))[4:12, 4:20], np.ones((8, 16)))
    assert polygon_coverage(rectangle, (32, 32)).sum() == 128
    assert polygon_coverage(rectangle - 10, (32, 32)).sum() == 2 * 10
    assert polygon_coverage(rectangle + 40, (32, 32)).sum() == 0


def test_random_colors_stay_away_from_the_heldout_colors():
    rng = np.random.default_rng(0)
    colors = np.array([random_color(rng) for _ in range(2000)], dtype=np.float64)
    for heldout in HELDOUT_COLORS.values():
        assert np.linalg.norm(colors - heldout, axis=1).min() >= MIN_HELDOUT_COLOR_DISTANCE
    assert colors.max(axis=1).min() >= 80 and len(np.unique(colors, axis=0)) > 1900


def test_make_polygons_dataset_mixes_shapes_images_and_is_byte_identical_per_seed():
    dataset = make_polygons_dataset(40, size=16, seed=3, shapes_fraction=0.25)
    texts = dataset["text"]
    shapes_rows = [i for i, text in enumerate(texts) if text in set(shapes_prompts())]
    assert len(shapes_rows) == 10 and shapes_rows == list(range(0, 40, 4))  # evenly spread
    # They are the shapes dataset's own images, in its order.
    shapes = make_shapes_dataset(10, size=16, seed=3)
    assert [dataset[i]["image"].tobytes() for i in shapes_rows] == [image.tobytes() for image in shapes["image"]]
    assert all(dataset[i]["image"].size == (16, 16) for i in range(40))
    again = make_polygons_dataset(40, size=16, seed=3, shapes_fraction=0.25)
    assert [im.tobytes() for im in again["image"]] == [im.tobytes() for im in dataset["image"]]
    other = make_polygons_dataset(40, size=16, seed=4, shapes_fraction=0.25)
    assert [im.tobytes() for im in other["image"]] != [im.tobytes() for im in dataset["image"]]


def test_polygons_source_and_config_key():
    config = DataConfig(dataset="polygons", shapes_num_images=8, resolution=16, polygons_shapes_fraction=0.5)
    dataset = config.load_dataset(seed=1)
    assert len(dataset) == 8 and sum(text in set(shapes_prompts()) for text in dataset["text"]) == 4
    with pytest.raises(ValueError, match="shapes_fraction must be in \\[0, 1\\], got 1.5"):
        load_image_caption_dataset("polygons", num_images=4, shapes_fraction=1.5)
    with pytest.raises(ValueError, match="The polygons dataset only has split 'train', got split='test'"):
        load_image_caption_dataset("polygons", split="test", num_images=4)
