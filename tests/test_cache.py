"""The sharded latent cache: what it stores, that shards and processes change nothing, that a killed build resumes."""

import io
import math
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from diffusers import AutoencoderKL
from PIL import Image

from latentddpm import cache as cache_module
from latentddpm.batching import MicroBatches, ShuffledStream, step_generator
from latentddpm.cache import LatentCache, build_latent_cache, cache_is_complete, finish_latent_cache
from latentddpm.data import make_shapes_dataset
from latentddpm.data.transforms import ImageTransform
from latentddpm.latents import encode_posterior
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder

N = 20


@pytest.fixture(scope="module")
def models(tiny_vae):
    tokenizer, text_encoder = load_text_encoder(default_text_encoder_path())
    tokenizer.model_max_length = 16
    return AutoencoderKL.from_pretrained(str(tiny_vae)).eval(), tokenizer, text_encoder.eval()


@pytest.fixture(scope="module")
def dataset():
    return make_shapes_dataset(num_images=N, size=16, seed=3)


def build(dataset, folder, models, process_index=0, num_processes=1, **settings):
    vae, tokenizer, text_encoder = models
    settings = dict(shard_size=N, dtype=torch.float32, batch_size=1, random_flip=True) | settings
    build_latent_cache(
        dataset,
        folder,
        image_column="image",
        caption_column="text",
        transform=ImageTransform(16),
        vae=vae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        process_index=process_index,
        num_processes=num_processes,
        show_progress=False,
        **settings,
    )


def built(dataset, folder, models, **settings) -> LatentCache:
    build(dataset, folder, models, **settings)
    finish_latent_cache(folder)
    return LatentCache(folder)


@pytest.fixture(scope="module")
def single(dataset, models, tmp_path_factory) -> LatentCache:
    """One shard, one process, float32: the layout of the cache before it was sharded."""
    return built(dataset, tmp_path_factory.mktemp("single"), models)


def test_rows_hold_each_image_posterior_and_caption_rows_its_text(single, dataset, models):
    vae, tokenizer, text_encoder = models
    transform = ImageTransform(16)
    pixels = torch.stack([transform(image) for image in dataset["image"]])
    with torch.no_grad():
        mean, std = encode_posterior(vae, pixels)
        mirror_mean, _ = encode_posterior(vae, pixels.flip(-1))
    rows = torch.arange(N)
    torch.testing.assert_close(single.gather("latent_mean", rows)[:, 0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.gather("latent_mean", rows)[:, 1], mirror_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.gather("latent_std", rows)[:, 0], std, rtol=1e-5, atol=1e-6)
    captions = [single.prompt(i) for i in single.gather("caption_ids", rows)[:, 0].tolist()]
    assert captions == dataset["text"]
    with torch.no_grad():
        hidden, mask = encode_prompt(captions[:3] + [""], tokenizer, text_encoder, "cpu")
    ids = torch.cat([single.gather("caption_ids", rows[:3])[:, 0], torch.tensor([single.empty_prompt_id])])
    cached_hidden, cached_mask = single.text(ids)
    torch.testing.assert_close(cached_hidden, hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached_mask, mask)


def test_two_processes_build_disjoint_shards_giving_the_single_file_batches(single, dataset, models, tmp_path):
    # Shards of 6 images and 6 captions (the empty prompt last), built by 2 processes one after the other.
    written = []
    for process_index in (0, 1):
        before = set(tmp_path.glob("*.safetensors"))
        build(dataset, tmp_path, models, process_index=process_index, num_processes=2, shard_size=6)
        written.append(set(tmp_path.glob("*.safetensors")) - before)
        assert not cache_is_complete(tmp_path)
    assert written[0] and written[1] and not written[0] & written[1]
    assert len(written[0] | written[1]) == math.ceil(N / 6) + math.ceil((len(set(dataset["text"])) + 1) / 6)
    finish_latent_cache(tmp_path)
    sharded = LatentCache(tmp_path)
    assert len(sharded.groups) == 4 and len(sharded) == N
    rows = torch.arange(N)  # every row once, in the dataset's order
    for key in ("latent_mean", "latent_std", "caption_ids"):
        assert torch.equal(sharded.gather(key, rows), single.gather(key, rows)), key

    stream = ShuffledStream(N, per_process=8, seed=0)
    for micro_step in range(4):  # batches that straddle shards and epochs
        got = MicroBatches(sharded, stream, seed=1, caption_dropout=0.2)[micro_step]
        expected = MicroBatches(single, stream, seed=1, caption_dropout=0.2)[micro_step]
        for key in ("rows", "latents", "caption_ids", "generator_state"):
            assert torch.equal(got[key], expected[key]), key
        assert torch.equal(sharded.text(got["caption_ids"])[0], single.text(expected["caption_ids"])[0])


def test_micro_batch_is_the_draw_of_its_step_generator(single):
    stream = ShuffledStream(N, per_process=4, num_processes=2, seed=0)
    batch = MicroBatches(single, stream, seed=5, process_index=1, caption_dropout=0.5)[3]
    generator = step_generator(5, 3, 1)
    drawn = single.draw(stream.indices(3, 1), generator, caption_dropout=0.5)
    assert torch.equal(batch["latents"], drawn["latents"]) and torch.equal(batch["caption_ids"], drawn["caption_ids"])
    assert torch.equal(batch["generator_state"], generator.get_state())
    loader = list(MicroBatches(single, stream, seed=5, process_index=1).loader(2, 5, num_workers=1))
    assert [batch["rows"].tolist() for batch in loader] == [stream.indices(m, 1).tolist() for m in (2, 3, 4)]


def test_float16_cache_is_the_float32_one_rounded(single, dataset, models, tmp_path):
    half = built(dataset, tmp_path, models, dtype=torch.float16)
    rows = torch.arange(N)
    assert half.gather("latent_mean", rows).dtype == torch.float16
    assert torch.equal(half.gather("latent_mean", rows), single.gather("latent_mean", rows).half())
    ids = torch.arange(half.empty_prompt_id + 1)
    assert torch.equal(half.text(ids)[0], single.text(ids)[0].half().float())


def test_bad_images_are_skipped_and_counted(dataset, models, tmp_path):
    images = [{"bytes": b"not an image", "path": None}, Image.new("RGB", (4, 4))] + list(dataset["image"][:4])
    buffers = []
    for image in images[1:]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffers.append({"bytes": buffer.getvalue(), "path": None})
    bad = Dataset.from_dict({"image": images[:1] + buffers, "text": ["x", "tiny"] + dataset["text"][:4]})
    build(bad, tmp_path, models, shard_size=4)
    index = finish_latent_cache(tmp_path)
    assert index["skipped"] == {"corrupt": 1, "too small": 1} and index["num_rows"] == 4
    cache = LatentCache(tmp_path)
    caption_ids = cache.gather("caption_ids", torch.arange(4))[:, 0]
    assert [cache.prompt(i) for i in caption_ids.tolist()] == dataset["text"][:4]


def _build_and_die_at_the_third_shard(dataset, folder, models) -> None:
    """In a child process: build, and SIGKILL itself while the third shard is being written (a partial temp file)."""
    write, calls = cache_module._write_shard, []

    def dying_write(tensors, path: Path, metadata) -> None:
        calls.append(path)
        if len(calls) == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        write(tensors, path, metadata)

    cache_module._write_shard = dying_write
    build(dataset, folder, models, shard_size=4)


def test_killed_build_resumes_at_its_missing_shards_and_ends_identical(dataset, models, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    built(dataset, uninterrupted, models, shard_size=4)
    killed = tmp_path / "killed"
    child = multiprocessing.get_context("spawn").Process(
        target=_build_and_die_at_the_third_shard, args=(dataset, killed, models)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    complete = sorted(path.name for path in killed.glob("*.safetensors"))
    assert len(complete) == 2 and not cache_is_complete(killed)
    mtimes = {name: (killed / name).stat().st_mtime_ns for name in complete}

    build(dataset, killed, models, shard_size=4)  # the resumed build
    finish_latent_cache(killed)
    assert {name: (killed / name).stat().st_mtime_ns for name in complete} == mtimes  # not encoded again
    files = sorted(path.name for path in uninterrupted.iterdir())
    assert sorted(path.name for path in killed.iterdir() if not path.name.endswith(".tmp")) == files
    for name in files:
        assert (killed / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_rows_out_of_range_are_refused(single):
    with pytest.raises(IndexError, match=r"Cache rows must be in \[0, 20\)"):
        single.gather("latent_mean", torch.tensor([0, N]))
