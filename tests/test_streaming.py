import io
import itertools
import json
import tarfile

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from latentddpm.data import ImageTransform, load_image_caption_dataset, prepare_image_dataset
from latentddpm.streaming import StreamingBatches, StreamingState, load_streaming_dataset, streaming_loader

NUM_SHARDS, ROWS_PER_SHARD = 4, 9
CORRUPT, TOO_SMALL = {5, 17, 30}, {22}  # rows whose image is not an image, and one of 3x3 pixels
GOOD = NUM_SHARDS * ROWS_PER_SHARD - len(CORRUPT) - len(TOO_SMALL)
TRANSFORM = ImageTransform(8, center_crop=False, random_flip=True)  # random draws, so the generators matter


@pytest.fixture(autouse=True)
def no_pause_after_parquet_shards(monkeypatch):
    """`datasets` sleeps 5 s after reading shards of parquet in parallel (for apache/arrow#45214, a crash at exit),
    once per epoch of every substream: a negligible pause for a real epoch, most of the time of these tests."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def image_bytes(row: int) -> bytes:
    if row in CORRUPT:
        return b"not an image " + bytes([row])
    side = 3 if row in TOO_SMALL else 10 + row % 7
    pixels = np.random.default_rng(row).integers(0, 256, (side, side + row % 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_rows(shard: int) -> range:
    return range(shard * ROWS_PER_SHARD, (shard + 1) * ROWS_PER_SHARD)


@pytest.fixture(scope="module")
def parquet_glob(tmp_path_factory) -> str:
    """Four parquet files of nine rows: PNGs of several sizes, three corrupt images and one too small."""
    folder = tmp_path_factory.mktemp("parquet")
    features = Features({"image": ImageFeature(), "text": Value("string"), "extra": Value("int64")})
    for shard in range(NUM_SHARDS):
        rows = shard_rows(shard)
        Dataset.from_dict(
            {
                "image": [{"bytes": image_bytes(row), "path": None} for row in rows],
                "text": [f"caption {row}" for row in rows],
                "extra": list(rows),
            },
            features=features,
        ).to_parquet(folder / f"train-{shard}.parquet")
    return str(folder / "train-*.parquet")


@pytest.fixture(scope="module")
def webdataset_folder(tmp_path_factory):
    """The same rows as webdataset tar shards: `<key>.png` and `<key>.txt` per sample."""
    folder = tmp_path_factory.mktemp("webdataset")
    for shard in range(NUM_SHARDS):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for row in shard_rows(shard):
                for extension, data in (("png", image_bytes(row)), ("txt", f"caption {row}".encode())):
                    info = tarfile.TarInfo(f"{row:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """The same rows as an imagefolder: `<row>.png` files and a metadata.jsonl of captions."""
    folder = tmp_path_factory.mktemp("imagefolder")
    with open(folder / "metadata.jsonl", "w") as metadata:
        for row in range(NUM_SHARDS * ROWS_PER_SHARD):
            (folder / f"{row:06d}.png").write_bytes(image_bytes(row))
            metadata.write(json.dumps({"file_name": f"{row:06d}.png", "text": f"caption {row}"}) + "\n")
    return folder


def make_batches(dataset, **kwargs) -> StreamingBatches:
    settings = {"transform": TRANSFORM, "per_process": 3, "seed": 7, "min_image_size": 8, "shuffle_buffer": 5}
    return StreamingBatches(dataset, **{**settings, **kwargs})


def take(batches: StreamingBatches, num_workers: int, count: int) -> list[dict]:
    return list(itertools.islice(streaming_loader(batches, num_workers=num_workers), count))


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert [batch["micro_step"] for batch in actual] == [batch["micro_step"] for batch in expected]
    for got, want in zip(actual, expected):
        assert got["captions"] == want["captions"]
        assert torch.equal(got["pixels"], want["pixels"])
        assert got["skipped"] == want["skipped"]


def read_epochs(
    batches: StreamingBatches, num_workers: int = 0
) -> list[tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """For the first two epochs of a process, with batches of one image: caption -> pixels of every image it read,
    in reading order, and the counts of the images skipped."""
    epochs = [({}, {"corrupt": 0, "too small": 0}) for _ in range(2)]
    # Enough batches for every substream to go through two epochs.
    for batch in take(batches, num_workers, 3 * GOOD):
        if batch["position"][0] < 2:
            pixels, skipped = epochs[batch["position"][0]]
            assert batch["captions"][0] not in pixels
            pixels[batch["captions"][0]] = batch["pixels"][0]
            for reason in skipped:
                skipped[reason] += batch["skipped"][reason]
    return epochs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_stream_matches_uninterrupted_run(parquet_glob, num_workers):
    dataset = load_streaming_dataset(parquet_glob)
    # 16 micro-batches of 3 read more than one epoch (32 usable images), crossing bad rows and the epoch boundary.
    uninterrupted = take(make_batches(dataset), num_workers, 16)
    assert all(batch["pixels"].shape == (3, 3, 8, 8) for batch in uninterrupted)
    assert uninterrupted[-1]["position"][0] == 1
    # Resuming at an odd micro-step, the first worker of the new loader reads the second substream.
    state = StreamingState(num_workers)
    for batch in uninterrupted[:9]:
        state.update(batch)

    resumed = take(make_batches(dataset, start_micro_step=9, positions=state.positions), num_workers, 7)
    assert_same_batches(resumed, uninterrupted[9:])
    replayed = take(make_batches(dataset, start_micro_step=9), num_workers, 7)  # no positions: decodes to find them
    assert_same_batches(replayed, uninterrupted[9:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_processes_read_disjoint_rows_that_cover_an_epoch(parquet_glob, num_workers):
    dataset = load_streaming_dataset(parquet_glob)
    (first, _), (second, _) = [
        read_epochs(make_batches(dataset, per_process=1, process_index=r, num_processes=2), num_workers)[0]
        for r in (0, 1)
    ]
    assert not first.keys() & second.keys()
    expected = {f"caption {row}" for row in range(NUM_SHARDS * ROWS_PER_SHARD)} - {
        f"caption {row}" for row in CORRUPT | TOO_SMALL
    }
    assert first.keys() | second.keys() == expected


def test_every_epoch_is_a_new_shuffle_of_every_row(parquet_glob):
    (first, _), (second, _) = read_epochs(make_batches(load_streaming_dataset(parquet_glob), per_process=1))
    assert len(first) == GOOD
    assert set(first) == set(second)
    assert list(first) != list(second)


def test_bad_images_are_skipped_and_counted(webdataset_folder):
    dataset = load_streaming_dataset(str(webdataset_folder), image_column="png", caption_column="txt")
    pixels, skipped = read_epochs(make_batches(dataset, per_process=1, image_column="png", caption_column="txt"))[0]
    assert skipped == {"corrupt": len(CORRUPT), "too small": len(TOO_SMALL)}
    assert len(pixels) == GOOD


@pytest.mark.parametrize("source", ["parquet_glob", "image_folder"])
def test_streamed_images_match_the_prepared_dataset(source, request, tmp_path):
    source = str(request.getfixturevalue(source))
    transform = ImageTransform(8)  # centre crop: no random draw, so each image has one expected tensor
    dataset, _ = prepare_image_dataset(load_image_caption_dataset(source, cache_dir=str(tmp_path)))
    expected = {row["text"]: transform(row["image"]) for row in dataset}

    streamed = load_streaming_dataset(source)
    pixels, _ = read_epochs(make_batches(streamed, transform=transform, per_process=1))[0]
    assert pixels.keys() == expected.keys()
    assert all(torch.equal(pixels[caption], expected[caption]) for caption in expected)


def test_webdataset_and_parquet_shards_stream_the_same_rows(parquet_glob, webdataset_folder):
    parquet = load_streaming_dataset(parquet_glob)
    webdataset = load_streaming_dataset(
        str(webdataset_folder / "train-*.tar"), image_column="png", caption_column="txt"
    )
    assert webdataset.num_shards == NUM_SHARDS
    assert sorted(row["txt"] for row in webdataset) == sorted(row["text"] for row in parquet)


def test_generated_dataset_streams_its_rows():
    dataset = load_streaming_dataset("shapes", num_images=12, size=16, seed=3)
    generated = load_image_caption_dataset("shapes", num_images=12, size=16, seed=3)
    pixels, skipped = read_epochs(make_batches(dataset, per_process=1, num_processes=2, process_index=1))[0]
    assert skipped == {"corrupt": 0, "too small": 0}
    assert len(pixels) == 6 and set(pixels) <= set(generated["text"])


def test_streamed_rows_are_not_decoded(webdataset_folder):
    dataset = load_streaming_dataset(str(webdataset_folder), image_column="png", caption_column="txt")
    assert dataset.features["png"] == ImageFeature(decode=False)
    assert all(isinstance(row["png"]["bytes"], bytes) for row in dataset)  # the corrupt rows read without raising


def test_missing_column_is_a_one_line_error(webdataset_folder):
    with pytest.raises(ValueError, match=r"^image_column 'image' not found in .*available columns: .*'png'") as error:
        load_streaming_dataset(str(webdataset_folder), caption_column="txt")
    assert "\n" not in str(error.value)


def test_positions_of_another_num_workers_are_rejected(parquet_glob):
    batches = make_batches(load_streaming_dataset(parquet_glob), start_micro_step=4, positions=[(0, 5), (0, 6)])
    with pytest.raises(ValueError, match="resume with the same num_workers"):
        streaming_loader(batches, num_workers=0)


def test_state_takes_batches_in_order():
    state = StreamingState(num_workers=2)
    state.update({"micro_step": 0, "position": [0, 4], "skipped": {"corrupt": 1, "too small": 0}})
    state.update({"micro_step": 1, "position": [0, 5], "skipped": {"corrupt": 1, "too small": 2}})
    assert state.positions == [(0, 4), (0, 5)] and state.skipped == {"corrupt": 2, "too small": 2}
    with pytest.raises(ValueError, match="Expected micro-batch 2, got 3"):
        state.update({"micro_step": 3, "position": (0, 9)})


def in_memory_stream(rows: list[int]):
    features = Features({"image": ImageFeature(), "text": Value("string")})
    images = [{"bytes": image_bytes(row), "path": None} for row in rows]
    return Dataset.from_dict(
        {"image": images, "text": [f"caption {row}" for row in rows]}, features
    ).to_iterable_dataset()


def test_a_stream_without_usable_images_raises():
    batches = make_batches(in_memory_stream(sorted(CORRUPT | TOO_SMALL)))
    with pytest.raises(ValueError, match=r"^No usable image in column 'image'"):
        next(iter(batches))


def test_a_process_without_rows_raises():
    batches = make_batches(in_memory_stream([0]), process_index=1, num_processes=2)
    with pytest.raises(ValueError, match=r"fewer rows than num_processes \* max\(1, num_workers\) = 2"):
        next(iter(batches))
