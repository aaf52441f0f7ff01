"""train_ldm on data that is not square or not on disk: aspect-ratio buckets with size conditioning, and streaming."""

import io
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_training import ldm_args, unet_weights

from latentddpm import LatentDDPMPipeline
from latentddpm.batching import BucketedStream, MicroBatches
from latentddpm.cache import LatentCache
from latentddpm.data.shapes import make_shapes_dataset
from latentddpm.data.transforms import ImageTransform
from latentddpm.training import train_ldm

# (width, height) of the images: landscape, square and portrait, for the buckets of resolution 32 with the tiny VAE
# and U-Net (sides in multiples of 8): 24x40, 32x32 and 40x24 (height x width).
SIZES = [(56, 30), (32, 32), (30, 50)]


def write_parquet(folder: Path, num_rows: int, num_files: int, corrupt_rows: tuple[int, ...] = ()) -> str:
    """Shapes images resized to SIZES in turn, with their captions, in `num_files` parquet files."""
    shapes = make_shapes_dataset(num_images=num_rows, size=32, seed=1)
    folder.mkdir(parents=True)
    rows = []
    for i, (image, caption) in enumerate(zip(shapes["image"], shapes["text"])):
        buffer = io.BytesIO()
        image.resize(SIZES[i % len(SIZES)]).save(buffer, format="PNG")
        rows.append(({"bytes": b"not a png" if i in corrupt_rows else buffer.getvalue(), "path": None}, caption))
    for f in range(num_files):
        part = rows[f::num_files]
        table = pa.table({"image": [image for image, _ in part], "text": [caption for _, caption in part]})
        pq.write_table(table, folder / f"train-{f}.parquet")
    return str(folder / "train-*.parquet")


def test_non_square_dataset_trains_on_single_bucket_batches_and_samples_at_its_buckets(tiny_vae, tmp_path, caplog):
    data = write_parquet(tmp_path / "data", 36, 1)
    extra = ("--dataset", data, "--resolution", "32", "--aspect_ratio_buckets", "true", "--size_conditioning", "true")
    extra += ("--random_flip", "true")  # each image and its mirror
    with caplog.at_level(logging.INFO):
        out = train_ldm.main(ldm_args(tiny_vae, tmp_path, *extra, "--train_batch_size", "4", "--max_train_steps", "3"))
    # 36 rows, 8 held out (tiny_ldm.yaml): the training rows' histogram, in pixels
    assert "Aspect-ratio buckets (height x width: images): {'24x40': " in caplog.text

    (index,) = (tmp_path / "cache").glob("*/index.json")
    cache = LatentCache(index.parent)
    sizes = cache.rows_by_size()
    assert sorted(sizes) == [(6, 10), (8, 8), (10, 6)]  # latents of 24x40, 32x32 and 40x24 images
    assert sorted(len(rows) for rows in sizes.values()) == [12, 12, 12]
    # a landscape image's size and crop: 56x30 covers 24x40 at 24x45 (height x width), center-cropped
    landscape = sizes[(6, 10)][:1]
    resized, (top, left) = ImageTransform(32).crop_box((30, 56), (24, 40))
    assert resized == (24, 45) and left == 2
    mirrored_left = resized[1] - left - 40  # the crop's left edge in the mirror image
    expected = [[30, 56, top, left, 24, 40], [30, 56, top, mirrored_left, 24, 40]]
    assert cache.gather("time_ids", landscape)[0].tolist() == expected

    stream = BucketedStream(list(sizes.values()), per_process=4, seed=0)
    for micro_step in range(6):  # every batch from one bucket (draw refuses mixed sizes), the same on a fresh stream
        batch = MicroBatches(cache, stream, seed=0)[micro_step]
        again = MicroBatches(cache, BucketedStream(list(sizes.values()), per_process=4, seed=0), seed=0)[micro_step]
        assert torch.equal(batch["latents"], again["latents"]) and batch["time_ids"].shape == (4, 6)

    pipe = LatentDDPMPipeline.from_pretrained(str(out))
    for height, width in ((24, 40), (32, 32), (40, 24)):
        image = pipe("a red circle", height=height, width=width, num_inference_steps=2, output_type="np").images
        assert image.shape == (1, height, width, 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_run_resumes_bitwise(tiny_vae, tmp_path, monkeypatch, num_workers):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # datasets' pause after parquet reads
    data = write_parquet(tmp_path / "data", 40, 4, corrupt_rows=(3, 17))
    extra = (
        "--dataset", data, "--streaming", "true", "--num_validation_samples", "0", "--shuffle_buffer", "8",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--dataloader_num_workers", str(num_workers),
        "--validation_prompts", "[]",
    )  # fmt: skip
    straight = train_ldm.main(ldm_args(tiny_vae, tmp_path / "a", *extra))
    checkpoint = straight / "checkpoints" / "checkpoint-2"
    resumed = train_ldm.main(ldm_args(tiny_vae, tmp_path / "b", *extra, "--resume_from_checkpoint", str(checkpoint)))
    got, expected = unet_weights(resumed), unet_weights(straight)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    runs = (straight, resumed)
    ema = [load_file(str(r / "checkpoints" / "checkpoint-4" / "ema_shard_0.safetensors")) for r in runs]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    states = [json.loads((r / "checkpoints" / "checkpoint-4" / "stream_state_0.json").read_text()) for r in runs]
    assert states[0] == states[1] and states[0]["micro_step"] == 4  # positions and images skipped
    assert json.loads((checkpoint / "stream_state_0.json").read_text())["micro_step"] == 2
    assert f"`{data}`, streamed" in (straight / "README.md").read_text()  # the model card's data row


def test_cache_command_builds_the_cache_training_then_opens(tiny_vae, tmp_path, caplog):
    args = ldm_args(tiny_vae, tmp_path, "--max_train_steps", "1", "--validation_prompts", "[]")
    folder = train_ldm.cache_main(args)
    assert (folder / "index.json").is_file() and folder.parent == tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        train_ldm.main(args)
    assert f"Reusing cached latents and text embeddings from {folder}" in caplog.text
