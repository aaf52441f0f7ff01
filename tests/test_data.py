import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from latentddpm.data import (
    ImageTransform,
    decode_rgb,
    load_image_caption_dataset,
    load_rgb,
    pick_caption,
    prepare_image_dataset,
)

CIFAR10 = Path(__file__).parents[2] / "shared/datasets/cifar10/train.parquet"


def encode(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# File name -> (bytes, what prepare_image_dataset must make of it: "ok", "corrupt" or "too small").
def image_files() -> dict[str, tuple[bytes, str]]:
    jpeg = encode(random_rgb(24, 20), "JPEG")
    deep = Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))
    # Left half index 0 (transparent), right half index 1 (red).
    palette = Image.fromarray(np.repeat(np.array([[0] * 8 + [1] * 8], dtype=np.uint8), 16, axis=0), mode="P")
    palette.putpalette([90, 90, 90, 200, 10, 10] + [0] * 762)
    return {
        "good.png": (encode(random_rgb(24, 24), "PNG"), "ok"),
        "good.jpg": (jpeg, "ok"),
        "gray.png": (encode(random_rgb(20, 20).convert("L"), "PNG"), "ok"),
        "rgba.png": (encode(random_rgb(20, 20).convert("RGBA"), "PNG"), "ok"),
        "cmyk.jpg": (encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "ok"),
        "deep.png": (encode(deep, "PNG"), "ok"),
        "palette.png": (encode(palette, "PNG", transparency=0), "ok"),
        "tiny.png": (encode(random_rgb(2, 2), "PNG"), "too small"),
        "corrupt.png": (b"this is not an image at all", "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "empty.jpg": (b"", "corrupt"),
    }


@pytest.fixture
def image_folder(tmp_path):
    """An imagefolder with a metadata.jsonl: good images of every mode next to corrupt, truncated, empty, tiny."""
    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, (data, _) in image_files().items():
            (folder / name).write_bytes(data)
            metadata.write(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n")
    return folder


@pytest.mark.parametrize("name", list(image_files()))
def test_decode_rgb_converts_or_rejects_each_file(name):
    data, expected = image_files()[name]
    rgb, reason = decode_rgb(data, min_size=8)
    if expected == "ok":
        assert reason is None and rgb.mode == "RGB" and min(rgb.size) >= 16
    else:
        assert rgb is None and reason == expected


def test_load_rgb_composites_transparency_over_the_background():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [200, 100, 50, 128]]], dtype=np.uint8))
    rgba = rgba.resize((9, 9), Image.Resampling.NEAREST)  # columns 0-2: transparent, opaque, half
    black = np.asarray(load_rgb(rgba))
    assert black[0, 0].tolist() == [0, 0, 0] and black[0, 4].tolist() == [255, 0, 0]
    np.testing.assert_allclose(black[0, 8], np.array([200, 100, 50]) * 128 / 255, atol=1)
    white = np.asarray(load_rgb(rgba, background=(255, 255, 255)))
    assert white[0, 0].tolist() == [255, 255, 255] and white[0, 4].tolist() == [255, 0, 0]
    np.testing.assert_allclose(white[0, 8], np.array([200, 100, 50]) * 128 / 255 + 255 * 127 / 255, atol=1)
    # Gray + alpha and a palette with a transparent index go through the same compositing.
    la = Image.merge("LA", (Image.new("L", (8, 8), 90), Image.new("L", (8, 8), 0)))
    assert np.asarray(load_rgb(la)).max() == 0
    palette = np.asarray(load_rgb(image_files()["palette.png"][0]))
    assert np.all(palette[:, :8] == 0) and np.all(palette[:, 8:] == [200, 10, 10])


def test_load_rgb_scales_16_bit_grayscale_to_8_bit():
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535, 30000] * 2] * 8, dtype=np.uint16))
    assert deep.mode == "I;16"
    assert np.asarray(load_rgb(encode(deep, "PNG")))[0, :4].tolist() == [[0] * 3, [100] * 3, [255] * 3, [117] * 3]
    # Mode I (32-bit integers, how older Pillow opened 16-bit PNGs) uses the same 0..65535 range.
    assert np.asarray(load_rgb(deep.convert("I")))[0, :3].tolist() == [[0] * 3, [100] * 3, [255] * 3]


def test_load_rgb_converts_grayscale_bilevel_and_cmyk():
    assert np.asarray(load_rgb(Image.new("L", (8, 8), 77)))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_rgb(Image.new("1", (8, 8), 1)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_rgb(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))[0, 0].tolist() == [255, 0, 0]


def test_load_rgb_applies_exif_orientation():
    image = random_rgb(20, 10)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    assert load_rgb(encode(image, "JPEG", exif=exif.tobytes())).size == (10, 20)


def test_load_rgb_reads_paths_bytes_and_datasets_dicts(tmp_path):
    data = encode(random_rgb(12, 12), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    expected = np.asarray(random_rgb(12, 12))
    for value in (
        data,
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(tmp_path / "a.png")},
    ):
        np.testing.assert_array_equal(np.asarray(load_rgb(value)), expected)
    assert decode_rgb(None) == (None, "corrupt")
    assert decode_rgb(tmp_path / "missing.png") == (None, "corrupt")
    with pytest.raises(ValueError, match="Cannot read an image from int"):
        load_rgb(3)


def test_load_rgb_rejects_images_below_min_size():
    image = random_rgb(30, 6)
    assert load_rgb(image, min_size=8) is None
    assert load_rgb(image, min_size=6).size == (30, 6)


def test_prepare_image_dataset_skips_bad_rows_with_counts(image_folder, tmp_path, caplog):
    dataset = load_image_caption_dataset(str(image_folder), cache_dir=str(tmp_path / "cache"))
    files = image_files()
    assert len(dataset) == len(files)
    caplog.set_level(logging.INFO, logger="latentddpm.data.images")
    prepared, report = prepare_image_dataset(dataset, "image", min_size=8)

    assert (report.total, report.corrupt, report.too_small) == (11, 3, 1)
    assert str(report) == "skipped 4 of 11 images (3 corrupt, 1 too small)"
    assert str(report) in caplog.text
    kept = sorted(f"caption of {name}" for name, (_, expected) in files.items() if expected == "ok")
    assert sorted(prepared["text"]) == kept
    # Every kept row now decodes and transforms.
    pixels = torch.stack([ImageTransform(16)(row["image"]) for row in prepared])
    assert pixels.shape == (7, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_prepare_image_dataset_raises_when_nothing_is_usable():
    files = image_files()
    bad = Dataset.from_dict({"picture": [files["corrupt.png"][0], files["tiny.png"][0]]})
    with pytest.raises(ValueError, match="No usable image left in column 'picture'.*skipped 2 of 2"):
        prepare_image_dataset(bad, "picture")
    with pytest.raises(ValueError, match="image_column 'image' not found.*\\['picture'\\]"):
        prepare_image_dataset(bad, "image")


def test_image_transform_center_crop_is_the_middle_square():
    image = random_rgb(48, 16)
    pixels = ImageTransform(16, center_crop=True)(image)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32)[:, 16:32]).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(pixels, expected)
    # Shorter side resized to the resolution, aspect kept: 48x16 -> 24x8 -> middle 8x8.
    assert ImageTransform(8)(image).shape == (3, 8, 8)
    assert ImageTransform(32)(image).shape == (3, 32, 32)  # upscales too


def test_image_transform_random_crop_and_flip_follow_the_generator():
    image = random_rgb(40, 16)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    crops = [transform(image, generator=torch.Generator().manual_seed(seed)) for seed in range(20)]
    again = [transform(image, generator=torch.Generator().manual_seed(seed)) for seed in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    # Each output is one of the 25 crops, mirrored or not; over 20 seeds several offsets and both flips occur.
    candidates = {
        (left, flip): array[:, :, left : left + 16].flip(-1) if flip else array[:, :, left : left + 16]
        for left in range(25)
        for flip in (False, True)
    }
    found = [next(key for key, candidate in candidates.items() if torch.equal(crop, candidate)) for crop in crops]
    assert len({left for left, _ in found}) > 5 and {flip for _, flip in found} == {False, True}


def test_image_transform_decodes_any_image_value_and_rejects_undecodable_ones():
    gray = Image.new("L", (8, 8), 51)
    expected = torch.full((3, 8, 8), 51 / 127.5 - 1)
    for value in (gray, encode(gray, "PNG"), {"bytes": encode(gray, "PNG"), "path": None}):
        torch.testing.assert_close(ImageTransform(8)(value), expected)
    with pytest.raises(
        ValueError, match="An image cannot be decoded; filter the dataset with `prepare_image_dataset`"
    ):
        ImageTransform(8)(b"garbage")
    with pytest.raises(ValueError, match="resolution must be a positive integer, got 0"):
        ImageTransform(0)


def test_pick_caption_draws_from_lists_with_the_generator():
    captions = ["a", "b", "c"]
    generator = torch.Generator().manual_seed(0)
    picks = [pick_caption(captions, generator) for _ in range(60)]
    assert set(picks) == set(captions)
    generator.manual_seed(0)
    assert [pick_caption(captions, generator) for _ in range(60)] == picks
    assert pick_caption("only one") == "only one"
    with pytest.raises(ValueError, match="non-empty list of strings, got \\[\\]"):
        pick_caption([])


def test_load_shapes_source_and_its_argument_checks():
    dataset = load_image_caption_dataset("shapes", num_images=12, size=16, seed=2, max_train_samples=5)
    assert len(dataset) == 5 and dataset[0]["image"].size == (16, 16)
    assert list(dataset["text"]) == list(
        load_image_caption_dataset("shapes", num_images=12, size=16, seed=2)["text"][:5]
    )
    with pytest.raises(ValueError, match="only has split 'train', got split='test'"):
        load_image_caption_dataset("shapes", split="test", num_images=4)
    with pytest.raises(
        ValueError,
        match="\\['num_images'\\] only apply to the generated sources \\['shapes', 'polygons'\\], not to source='some",
    ):
        load_image_caption_dataset("some/dataset", num_images=4)
    with pytest.raises(
        ValueError,
        match="caption_column 'caption' not found in 'shapes'; available columns: "
        "\\['image', 'text', 'color', 'shape', 'position'\\]",
    ):
        load_image_caption_dataset("shapes", caption_column="caption", num_images=4)
    with pytest.raises(ValueError, match="max_train_samples must be a positive integer or None, got 0"):
        load_image_caption_dataset("shapes", num_images=4, max_train_samples=0)


def test_load_parquet_files_by_path_and_glob(tmp_path):
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    for shard in range(2):
        images = [encode(random_rgb(12, 12, 10 * shard + i), "PNG") for i in range(3)]
        Dataset.from_dict(
            {"image": images, "caption": [f"{shard}-{i}" for i in range(3)]}, features=features
        ).to_parquet(tmp_path / f"train-{shard}.parquet")
    cache = str(tmp_path / "cache")
    one = load_image_caption_dataset(str(tmp_path / "train-1.parquet"), caption_column="caption", cache_dir=cache)
    assert list(one["caption"]) == ["1-0", "1-1", "1-2"]
    np.testing.assert_array_equal(np.asarray(one[0]["image"]), np.asarray(random_rgb(12, 12, 10)))
    both = load_image_caption_dataset(str(tmp_path / "train-*.parquet"), caption_column="caption", cache_dir=cache)
    assert sorted(both["caption"]) == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    with pytest.raises(ValueError, match="No file matches source="):
        load_image_caption_dataset(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(ValueError, match="image_column 'img' not found"):
        load_image_caption_dataset(
            str(tmp_path / "train-0.parquet"), image_column="img", caption_column="caption", cache_dir=cache
        )


def test_load_empty_parquet_raises_before_training(tmp_path):
    features = Features({"image": ImageFeature(), "text": Value("string")})
    Dataset.from_dict({"image": [], "text": []}, features=features).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match='Instruction "train" corresponds to no data'):
        load_image_caption_dataset(str(tmp_path / "empty.parquet"), cache_dir=str(tmp_path / "cache"))


@pytest.mark.skipif(not CIFAR10.exists(), reason="needs ../shared/datasets/cifar10 beside the repository")
def test_cifar10_parquet_loads_prepares_and_transforms(tmp_path):
    dataset = load_image_caption_dataset(str(CIFAR10), max_train_samples=64, cache_dir=str(tmp_path))
    assert len(dataset) == 64
    prepared, report = prepare_image_dataset(dataset, "image", min_size=32)
    assert report.skipped == 0 and len(prepared) == 64
    pixels = torch.stack([ImageTransform(32)(row["image"]) for row in prepared])
    assert pixels.shape == (64, 3, 32, 32)
    # Real photos use most of the range, unlike a constant or garbled decode.
    assert pixels.min() < -0.9 and pixels.max() > 0.9
    assert all(pick_caption(caption).startswith("a photo of a") for caption in prepared["text"])
