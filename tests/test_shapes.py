import itertools
import math

import numpy as np
import pytest
import torch
from datasets import Image
from PIL import ImageFilter

from latentddpm.data.shapes import (
    COLORS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    SHAPES,
    make_shapes_dataset,
    parse_shapes_caption,
    render_shape,
    shapes_caption,
    shapes_combinations,
    shapes_prompts,
)
from latentddpm.eval.shapes_judge import judge_image, score_shapes

ATTRIBUTES = ("color", "shape", "position")


@pytest.fixture(scope="module", params=[32, 64])
def sized_dataset(request):
    """(size, dataset) with 900 images of that size, 10 of each of the 90 combinations."""
    return request.param, make_shapes_dataset(900, size=request.param, seed=1)


def test_shapes_prompts_are_the_90_combinations_in_a_fixed_order():
    prompts = shapes_prompts()
    assert len(prompts) == len(set(prompts)) == 6 * 3 * 5
    assert prompts[0] == "a red circle in the top left"
    assert prompts[-1] == "a cyan triangle in the center"
    assert [parse_shapes_caption(p) for p in prompts] == list(itertools.product(COLORS, SHAPES, POSITIONS))


def test_parse_shapes_caption_ignores_case_and_whitespace():
    assert parse_shapes_caption("  A Red Triangle in the TOP LEFT\n") == ("red", "triangle", "top left")


@pytest.mark.parametrize("caption", ["a red triangle", "a pink circle in the center", "a red circle in the middle"])
def test_parse_shapes_caption_rejects_other_text(caption):
    with pytest.raises(ValueError, match="is not a shapes caption.*'purple'"):
        parse_shapes_caption(caption)


def test_render_shape_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown shape 'star'; expected one of \\['circle', 'square', 'triangle'\\]"):
        render_shape("red", "star", "center")
    with pytest.raises(ValueError, match="Unknown color 'pink'"):
        shapes_caption("pink", "circle", "center")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("position", ["top left", "bottom right", "center"])
def test_render_shape_matches_closed_form_area_and_centroid(shape, position):
    size = 64
    image = np.asarray(render_shape("yellow", shape, position, size=size), dtype=np.float64)
    # Coverage of each pixel, read back from the red channel (230 for full coverage).
    coverage = image[..., 0] / COLORS["yellow"][0]
    assert np.all(image[coverage == 0] == 0), "background must be black"
    half_size = 6 / 32 * size  # the default without rng
    area = {"circle": math.pi * half_size**2, "square": 4 * half_size**2, "triangle": 2 * half_size**2}[shape]
    assert coverage.sum() == pytest.approx(area, rel=0.02)
    ys, xs = np.mgrid[:size, :size] + 0.5
    centroid = ((coverage * xs).sum() / coverage.sum(), (coverage * ys).sum() / coverage.sum())
    # The triangle's centroid lies one third of its height (2h) above its base, i.e. h/3 below the box centre.
    offset_y = half_size / 3 if shape == "triangle" else 0.0
    expected = (POSITIONS[position][0] * size, POSITIONS[position][1] * size + offset_y)
    assert centroid == pytest.approx(expected, abs=0.05)


def test_triangle_apex_is_up():
    coverage = np.asarray(render_shape("red", "triangle", "center", size=64), dtype=np.float64)[..., 0]
    rows = np.nonzero(coverage.sum(axis=1))[0]
    top, bottom = coverage[rows[0] : rows[0] + 4].sum(), coverage[rows[-1] - 3 : rows[-1] + 1].sum()
    assert bottom > 5 * top
    # The upper half of an apex-up triangle holds 1/4 of its area.
    middle = (rows[0] + rows[-1] + 1) // 2
    assert coverage[:middle].sum() / coverage.sum() == pytest.approx(0.25, abs=0.03)


def test_make_shapes_dataset_has_captioned_columns_and_balanced_combinations(sized_dataset):
    size, dataset = sized_dataset
    assert dataset.column_names == ["image", "text", "color", "shape", "position"]
    assert isinstance(dataset.features["image"], Image)
    assert all(image.size == (size, size) and image.mode == "RGB" for image in dataset.select(range(10))["image"])
    rows = list(zip(dataset["color"], dataset["shape"], dataset["position"]))
    assert [shapes_caption(*row) for row in rows] == list(dataset["text"])
    assert {combination: rows.count(combination) for combination in shapes_combinations()} == dict.fromkeys(
        shapes_combinations(), 10
    )


def test_make_shapes_dataset_is_byte_identical_for_the_same_seed():
    def image_bytes(seed):
        dataset = make_shapes_dataset(50, size=16, seed=seed).cast_column("image", Image(decode=False))
        return [row["bytes"] for row in dataset["image"]], list(dataset["text"])

    assert image_bytes(3) == image_bytes(3)
    assert image_bytes(3)[0] != image_bytes(4)[0]


def test_make_shapes_dataset_leaves_out_holdout_given_as_tuples_or_captions():
    holdout = [("red", "triangle", "center"), "a blue square in the top left"]
    dataset = make_shapes_dataset(88 * 2, size=16, holdout=holdout)
    captions = set(dataset["text"])
    assert len(captions) == 88
    assert "a red triangle in the center" not in captions and "a blue square in the top left" not in captions
    with pytest.raises(ValueError, match="Unknown position 'middle'"):
        make_shapes_dataset(4, holdout=[("red", "circle", "middle")])
    with pytest.raises(ValueError, match="holdout removes all 90 combinations"):
        make_shapes_dataset(4, holdout=shapes_prompts())


def test_default_holdout_keeps_every_attribute_and_pair_in_training():
    training = set(shapes_combinations()) - set(DEFAULT_HOLDOUT)
    assert len(training) == 90 - len(DEFAULT_HOLDOUT) and len(DEFAULT_HOLDOUT) == 6
    values = (list(COLORS), list(SHAPES), list(POSITIONS))
    for i, j in itertools.combinations(range(3), 2):
        seen = {(combination[i], combination[j]) for combination in training}
        assert seen == set(itertools.product(values[i], values[j])), (ATTRIBUTES[i], ATTRIBUTES[j])


def test_judge_reads_every_rendered_attribute(sized_dataset):
    _, dataset = sized_dataset
    scores = score_shapes(dataset["image"], dataset["text"])
    assert scores["n"] == 900
    assert min(scores[f"{a}_acc"] for a in ATTRIBUTES) >= 0.99
    assert scores["all_acc"] >= 0.99


def test_judge_reads_noisy_blurred_images(sized_dataset):
    # A slight blur and Gaussian noise (std 0.05 in [0, 1] units) stand in for what a VAE round trip and an
    # imperfect sampler do to an image.
    size, dataset = sized_dataset
    rng = np.random.default_rng(0)
    degraded = [
        np.asarray(image.filter(ImageFilter.GaussianBlur(0.6 * size / 32)), dtype=np.float64) / 255
        + rng.normal(0.0, 0.05, (size, size, 3))
        for image in dataset["image"]
    ]
    scores = score_shapes(degraded, dataset["text"])
    assert min(scores[f"{a}_acc"] for a in ATTRIBUTES) >= 0.99, scores


def test_judge_scores_chance_on_random_noise_images():
    rng = np.random.default_rng(0)
    prompts = shapes_prompts() * 2  # every colour, shape and position equally often, so chance is 1/6, 1/3, 1/5
    noise = torch.from_numpy(rng.random((len(prompts), 3, 32, 32)))
    scores = score_shapes(noise, prompts)
    assert scores["color_acc"] < 0.3 and scores["shape_acc"] < 0.5 and scores["position_acc"] < 0.35, scores
    assert scores["all_acc"] < 0.05


@pytest.mark.parametrize("wrong", ATTRIBUTES)
def test_judge_scores_zero_on_the_attribute_a_prompt_gets_wrong(wrong):
    rng = np.random.default_rng(0)
    combinations = shapes_combinations()
    images = [render_shape(*combination, size=32, rng=rng) for combination in combinations]
    values = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}[wrong]
    index = ATTRIBUTES.index(wrong)
    prompts = []
    for combination in combinations:
        # Replace the attribute by the next value in its list, so the prompt is wrong on it and right on the rest.
        changed = list(combination)
        changed[index] = values[(values.index(combination[index]) + 1) % len(values)]
        prompts.append(shapes_caption(*changed))
    scores = score_shapes(images, prompts)
    assert scores[f"{wrong}_acc"] == 0.0 and scores["all_acc"] == 0.0
    assert all(scores[f"{a}_acc"] == 1.0 for a in ATTRIBUTES if a != wrong)


def test_judge_gives_the_same_verdict_for_every_image_format():
    image = render_shape("purple", "triangle", "bottom left", size=48, rng=np.random.default_rng(5))
    uint8 = np.array(image)
    formats = [
        image,
        uint8,
        uint8 / 255.0,
        torch.from_numpy(uint8).permute(2, 0, 1),
        torch.from_numpy(uint8).permute(2, 0, 1).float() / 255,
        torch.from_numpy(uint8).permute(2, 0, 1).to(torch.bfloat16) / 255,
    ]
    expected = {"color": "purple", "shape": "triangle", "position": "bottom left"}
    assert [judge_image(x) for x in formats] == [expected] * len(formats)
    # Larger images are judged after downsampling to the working size.
    assert judge_image(image.resize((256, 256))) == expected


def test_judge_returns_none_on_a_blank_image():
    assert judge_image(np.zeros((32, 32, 3), dtype=np.uint8)) == {"color": None, "shape": None, "position": None}
    assert score_shapes([np.zeros((32, 32, 3))], ["a red circle in the center"])["all_acc"] == 0.0


def test_score_shapes_rejects_bad_prompts_and_shapes():
    image = render_shape("red", "circle", "center")
    with pytest.raises(ValueError, match="'a photo of a cat' is not a shapes caption"):
        score_shapes([image], ["a photo of a cat"])
    with pytest.raises(ValueError, match="Got 2 images but 1 prompts"):
        score_shapes([image, image], ["a red circle in the center"])
    with pytest.raises(ValueError, match=r"must have shape \(3, H, W\)"):
        judge_image(torch.zeros(32, 32, 3))
    with pytest.raises(ValueError, match=r"must have shape \(H, W, 3\)"):
        judge_image(np.zeros((3, 32, 32)))
