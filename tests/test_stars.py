import numpy as np
import pytest

from latentddpm.data.polygons import PENTAGRAM_INNER_RATIO, polygon_coverage, render_polygons, star_vertices
from latentddpm.data.shapes import POSITIONS, render_shape, shape_coverage
from latentddpm.eval.stars import MAX_STAR_SOLIDITY, judge_star, outline_solidity, render_star, score_stars

ORANGE = (255, 140, 0)
# A regular pentagon is a five-pointed "star" whose inner vertices lie on its outline: inner radius cos(36 deg).
PENTAGON_INNER_RATIO = float(np.cos(np.pi / 5))


def large_mask(vertices: np.ndarray, size: int = 512) -> np.ndarray:
    return polygon_coverage(vertices, (size, size)) > 0.5


def test_solidity_of_large_drawn_outlines_matches_the_closed_forms():
    # Pentagram: 10 triangles of area R r sin(36 deg) / 2 over the pentagon of area 5 R^2 sin(72 deg) / 2.
    pentagram = 2 * PENTAGRAM_INNER_RATIO * np.sin(np.pi / 5) / np.sin(2 * np.pi / 5)
    assert outline_solidity(large_mask(star_vertices((256, 256), 240))) == pytest.approx(pentagram, abs=0.01)
    # Convex outlines: a pentagon and a triangle fill their hulls.
    pentagon = star_vertices((256, 256), 240, inner_ratio=PENTAGON_INNER_RATIO)
    assert outline_solidity(large_mask(pentagon)) == pytest.approx(1.0, abs=0.01)
    triangle = shape_coverage("triangle", (256, 256), 240, (512, 512)) > 0.5
    assert outline_solidity(triangle) == pytest.approx(1.0, abs=0.01)


def test_solidity_of_a_single_pixel_is_one_and_an_empty_mask_is_an_error():
    mask = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="at least one pixel"):
        outline_solidity(mask)
    mask[1, 2] = True
    assert outline_solidity(mask) == 1.0


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("diameter", [16, 20])
def test_judge_accepts_a_drawn_orange_star_at_its_position(position, diameter):
    judged = judge_star(render_star(position, diameter), position)
    assert judged["star_ok"] and judged["color"] == "orange" and judged["position"] == position
    assert judged["solidity"] < 0.65 and judged["color_distance"] < 1.0


def test_judge_rejects_a_pentagon_a_triangle_a_wrong_place_and_a_yellow_star():
    pentagon = render_polygons([(star_vertices((16, 16), 8, inner_ratio=PENTAGON_INNER_RATIO), ORANGE)])
    judged = judge_star(pentagon, "center")
    assert judged["solidity"] > 0.9 and not judged["concave"] and judged["color_ok"] and not judged["star_ok"]
    judged = judge_star(render_shape("yellow", "triangle", "center"), "center")
    assert judged["solidity"] > MAX_STAR_SOLIDITY and judged["color"] == "yellow" and not judged["star_ok"]
    judged = judge_star(render_star("top left", 16), "bottom right")
    assert judged["concave"] and judged["color_ok"] and not judged["position_ok"] and not judged["star_ok"]
    judged = judge_star(render_star("center", 16, color=(230, 210, 40)), "center")
    assert judged["concave"] and judged["color"] == "yellow" and judged["color_distance"] > 90


def test_score_stars_counts_each_check_and_handles_blank_images():
    images = [render_star("center", 16), render_star("top left", 16), np.zeros((32, 32, 3), dtype=np.uint8)]
    scores = score_stars(images, ["center", "center", "center"])
    assert scores["n"] == 3 and scores["star_acc"] == pytest.approx(1 / 3)
    assert scores["concave_acc"] == scores["color_acc"] == pytest.approx(2 / 3)
    assert scores["position_acc"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="Got 3 images but 1 positions"):
        score_stars(images, ["center"])
    with pytest.raises(ValueError, match="Unknown position 'middle'"):
        judge_star(images[0], "middle")
