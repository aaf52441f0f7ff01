"""Aspect-ratio buckets: the bucket sizes, the choice of a bucket, the side multiple the models take, and
`BucketedStream`'s single-bucket batches."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from test_data import random_rgb
from test_pipeline import make_pipe
from test_unet import make_inputs, make_unet

from latentddpm.batching import BucketedStream
from latentddpm.buckets import aspect_ratio_buckets, bucket_multiple, bucket_name, nearest_bucket
from latentddpm.data import ImageTransform
from latentddpm.losses import Objective, training_losses
from latentddpm.models import ConditionalUNet, to_unet2d_condition_config
from latentddpm.models.unet_blocks import Downsample
from latentddpm.schedulers import DDPMNoiseScheduler


@pytest.mark.parametrize("resolution, multiple, max_aspect_ratio", [(16, 4, 2.0), (512, 64, 2.0), (1024, 64, 4.0)])
def test_buckets_are_the_largest_sizes_in_both_directions(resolution, multiple, max_aspect_ratio):
    buckets = aspect_ratio_buckets(resolution, multiple, max_aspect_ratio)
    # Oracle by brute force: the pairs of multiples within the aspect ratio and area that no step of `multiple` in
    # height or in width can enlarge.
    sides = range(multiple, int(resolution * max_aspect_ratio) + 1, multiple)
    area = resolution**2
    expected = [
        (h, w)
        for h in sides
        for w in sides
        if h * w <= area
        and max(h, w) <= max_aspect_ratio * min(h, w)
        and (h + multiple) * w > area
        and h * (w + multiple) > area
    ]
    assert buckets == expected  # sorted, so ordered by height
    assert (resolution, resolution) in buckets
    assert buckets == sorted((w, h) for h, w in buckets)  # portrait and landscape mirror each other


def test_buckets_include_sdxl_sizes():
    # The landscape half of the table in appendix I of the SDXL paper (https://arxiv.org/abs/2307.01952), where a
    # height has two widths, the wider one.
    sdxl = [(512, 2048), (576, 1792), (640, 1600), (704, 1472), (768, 1344), (832, 1216), (896, 1152), (960, 1088)]
    assert set(sdxl) <= set(aspect_ratio_buckets(1024, 64, max_aspect_ratio=4.0))


def test_bucket_arguments_are_checked():
    with pytest.raises(ValueError, match="resolution=100 must be a positive multiple of multiple=64"):
        aspect_ratio_buckets(100, 64)
    with pytest.raises(ValueError, match="max_aspect_ratio=0.5 must be at least 1"):
        aspect_ratio_buckets(128, 64, max_aspect_ratio=0.5)
    assert aspect_ratio_buckets(128, 64, max_aspect_ratio=1.0) == [(128, 128)]
    with pytest.raises(ValueError, match="no buckets"):
        nearest_bucket(10, 10, [])


def test_nearest_bucket_is_closest_in_log_aspect_ratio():
    buckets = aspect_ratio_buckets(1024, 64, max_aspect_ratio=4.0)
    generator = torch.Generator().manual_seed(0)
    for width, height in torch.randint(16, 4000, (500, 2), generator=generator).tolist():
        distances = sorted((abs(math.log(h / w) - math.log(height / width)), (h, w)) for h, w in buckets)
        if distances[1][0] - distances[0][0] > 1e-9:  # ties are the next test's
            assert nearest_bucket(width, height, buckets) == distances[0][1]
    assert nearest_bucket(1344, 768, buckets) == (768, 1344)  # an exact match
    assert nearest_bucket(768, 1344, buckets) == (1344, 768)


def test_nearest_bucket_ties_go_to_the_squarer_bucket():
    # A 1:2 image is as far from 1:1 as from 1:4 in log scale.
    for buckets in ([(16, 16), (16, 64)], [(16, 64), (16, 16)]):
        assert nearest_bucket(64, 32, buckets) == (16, 16)
    # Equally square too: the first listed.
    assert nearest_bucket(30, 30, [(12, 20), (20, 12)]) == (12, 20)
    assert nearest_bucket(30, 30, [(20, 12), (12, 20)]) == (20, 12)


def test_bucket_multiple_is_what_vae_and_unet_divide_sides_by():
    pipe = make_pipe()
    config = dict(pipe.unet.config) | {"block_out_channels": (32, 64, 64), "attention_levels": (False, True, True)}
    unet = ConditionalUNet.from_config(config).eval()
    multiple = bucket_multiple(pipe.vae, unet)
    # Oracles: the VAE's latent size, and the factor below which diffusers' UNet2DConditionModel forwards sizes.
    latents = pipe.vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    diffusers_unet = UNet2DConditionModel(**to_unet2d_condition_config(unet.config))
    assert multiple == (16 // latents.shape[-1]) * 2**diffusers_unet.num_upsamplers == 8


def test_unet_halves_every_level_exactly_at_every_bucket():
    pipe = make_pipe()
    config = dict(pipe.unet.config) | {"block_out_channels": (32, 64, 64), "attention_levels": (False, True, True)}
    unet = ConditionalUNet.from_config(config).eval()
    factor = pipe.vae_scale_factor
    multiple = bucket_multiple(pipe.vae, unet)
    downsampled = []
    for module in unet.modules():
        if isinstance(module, Downsample):
            module.register_forward_pre_hook(lambda module, args: downsampled.append(tuple(args[0].shape[-2:])))

    def run(height: int, width: int) -> None:
        sample = torch.randn(1, 4, height // factor, width // factor)
        with torch.no_grad():
            output = unet(sample, 10, torch.randn(1, 3, unet.config.cross_attention_dim)).sample
        assert output.shape == sample.shape

    buckets = aspect_ratio_buckets(8 * multiple, multiple)
    assert buckets == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    for height, width in buckets:
        run(height, width)
    assert len(downsampled) == 2 * len(buckets) and all(h % 2 == 0 and w % 2 == 0 for h, w in downsampled)
    downsampled.clear()
    run(8 * multiple + factor, 8 * multiple)  # not a multiple: runs, but a level gets an odd size
    assert any(h % 2 for h, _ in downsampled)


def test_bucket_name_is_height_by_width():
    assert bucket_name((768, 1344)) == "768x1344"


@pytest.mark.parametrize("bucket", [(12, 20), (20, 12)])
def test_pipeline_samples_at_a_bucket_size(bucket):
    pipe = make_pipe()  # 16x16 images, factor-2 VAE, a two-level U-Net: buckets of 16**2 pixels in multiples of 4
    assert bucket in aspect_ratio_buckets(16, bucket_multiple(pipe.vae, pipe.unet))
    height, width = bucket
    prompts = ["a red circle", "a blue square"]
    pixels = pipe(prompts, height=height, width=width, num_inference_steps=2, output_type="pt").images
    assert pixels.shape == (2, 3, height, width) and torch.isfinite(pixels).all()


def make_bucketed_stream(sizes=(37, 0, 5, 20), per_process=4, num_processes=1, seed=0):
    """A stream over buckets of the given sizes, holding consecutive global rows."""
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    bucket_rows = [torch.arange(start, end) for start, end in zip(bounds, bounds[1:])]
    return BucketedStream(bucket_rows, per_process, num_processes, seed), bucket_rows


def test_bucketed_batches_are_single_bucket_and_full():
    stream, bucket_rows = make_bucketed_stream()
    assert stream.num_rows == 62 and stream.batches_per_epoch == 10 + 0 + 2 + 5
    for m in range(3 * stream.batches_per_epoch):
        rows = stream.indices(m)
        assert rows.shape == (4,)
        assert set(rows.tolist()) <= set(bucket_rows[stream.bucket(m)].tolist())


def test_bucketed_epochs_cover_every_row_and_reshuffle():
    stream, _ = make_bucketed_stream()
    length = stream.batches_per_epoch
    epochs = [torch.cat([stream.indices(m) for m in range(e * length, (e + 1) * length)]) for e in range(3)]
    for rows in epochs:
        assert set(rows.tolist()) == set(range(62))
        # Only the wrapped rows of the last batch of each bucket come twice: 40 - 37 + 8 - 5 + 20 - 20.
        assert len(rows) - 62 == 6
    assert not torch.equal(epochs[0], epochs[1])


def test_bucketed_batches_are_a_function_of_the_step_only():
    a, _ = make_bucketed_stream(seed=3)
    b, _ = make_bucketed_stream(seed=3)
    steps = (40, 3, 17, 16, 0)  # any order and across epochs, as after a resume
    late = [(b.indices(m), b.bucket(m)) for m in steps]
    assert all(torch.equal(rows, a.indices(m)) and bucket == a.bucket(m) for (rows, bucket), m in zip(late, steps))
    other, _ = make_bucketed_stream(seed=4)
    assert not all(torch.equal(other.indices(m), a.indices(m)) for m in range(10))


def test_bucketed_processes_split_the_global_batch_without_overlap():
    sizes = (40, 16, 24)  # multiples of the global batch: no batch wraps around
    single, _ = make_bucketed_stream(sizes, per_process=8, seed=1)
    double, _ = make_bucketed_stream(sizes, per_process=4, num_processes=2, seed=1)
    for m in range(2 * single.batches_per_epoch):
        first, second = double.indices(m, 0), double.indices(m, 1)
        assert torch.equal(torch.cat([first, second]), single.indices(m))
        assert not set(first.tolist()) & set(second.tolist())


def test_bucket_frequencies_follow_bucket_sizes():
    sizes = (300, 100, 40, 0, 60)
    stream, _ = make_bucketed_stream(sizes=sizes, per_process=5, num_processes=2)
    counts = Counter(stream.bucket(m) for m in range(20 * stream.batches_per_epoch))
    # Every epoch has ceil(size / 10) batches of each bucket, which here is size / 10.
    assert counts == Counter({i: 20 * size // 10 for i, size in enumerate(sizes) if size})
    first_epoch = [stream.bucket(m) for m in range(stream.batches_per_epoch)]
    assert first_epoch != sorted(first_epoch)  # buckets come in random order


def test_bucketed_stream_without_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="Every bucket is empty \\(2 buckets\\)"):
        BucketedStream([torch.arange(0), torch.arange(0)], per_process=2)


def pixels_of(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("image_size, size, window", [((40, 16), (16, 24), (0, 8)), ((16, 40), (24, 16), (8, 0))])
def test_image_transform_center_crops_to_a_bucket(image_size, size, window):
    # The image's shorter side fits the bucket already: no resize, the middle window of the longer side.
    width, height = image_size
    image = random_rgb(width, height)
    pixels, time_ids = ImageTransform(8).with_time_ids(image, size=size)
    top, left = window
    torch.testing.assert_close(pixels, pixels_of(image)[:, top : top + size[0], left : left + size[1]])
    assert time_ids == (height, width, top, left, *size)
    torch.testing.assert_close(ImageTransform(8)(image, size=size), pixels)


def test_image_transform_resizes_to_cover_the_bucket():
    image = random_rgb(48, 16)  # 3:1
    transform = ImageTransform(8)
    assert transform.crop_box((16, 48), (8, 12)) == ((8, 24), (0, 6))  # halved, then the middle 12 columns
    assert transform(image, size=(8, 12)).shape == (3, 8, 12)
    assert transform.crop_box((16, 48), (40, 24)) == ((40, 120), (0, 48))  # upscaled so the height fits
    pixels, alpha = transform.with_alpha(image, size=(40, 24))
    assert pixels.shape == (3, 40, 24) and torch.equal(alpha, torch.ones(1, 40, 24))
    # Without a size, the square of `resolution`, as before buckets.
    assert torch.equal(transform(image), transform(image, size=(8, 8)))
    assert transform.crop_box((16, 48)) == ((8, 24), (0, 8))
    with pytest.raises(ValueError, match="size must be a positive \\(height, width\\), got \\(0, 8\\)"):
        transform(image, size=(0, 8))


def test_image_transform_time_ids_locate_random_crops_and_flips():
    image = random_rgb(40, 16)  # covers the (16, 20) crop without a resize
    array = pixels_of(image)
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    lefts, flips = set(), set()
    for seed in range(20):
        pixels, (original_height, original_width, top, left, height, width) = transform.with_time_ids(
            image, generator=torch.Generator().manual_seed(seed), size=(16, 20)
        )
        assert (original_height, original_width, top, height, width) == (16, 40, 0, 16, 20)
        # The crop's corner is in the image as the output shows it: mirrored when the output is.
        window = array[:, :, left : left + 20]
        flipped = array.flip(-1)[:, :, left : left + 20]
        assert torch.equal(pixels, window) or torch.equal(pixels, flipped)
        flips.add(torch.equal(pixels, flipped))
        lefts.add(left)
        # The same draws as calling the transform, and as `crop_box` before the flip.
        assert torch.equal(pixels, transform(image, torch.Generator().manual_seed(seed), size=(16, 20)))
        _, (box_top, box_left) = transform.crop_box((16, 40), (16, 20), torch.Generator().manual_seed(seed))
        assert (box_top, box_left) == (0, 40 - 20 - left if torch.equal(pixels, flipped) else left)
    assert flips == {False, True} and len(lefts) > 5


@pytest.mark.parametrize("pooled_projection_dim", [None, 12])
def test_size_conditioning_matches_sdxl_text_time_embedding(pooled_projection_dim):
    unet = make_unet(addition_time_embed_dim=8, pooled_projection_dim=pooled_projection_dim).eval()
    # Oracle: diffusers' SDXL embedding, whose MLP takes the pooled text embedding (here of width 0 or 12) followed
    # by the sinusoidal features of the six ids.
    text_dim = pooled_projection_dim or 0
    base = dict(unet.config) | {"addition_time_embed_dim": None, "pooled_projection_dim": None}
    twin = UNet2DConditionModel(
        **to_unet2d_condition_config(base),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_dim + 6 * 8,
    ).eval()
    twin.load_state_dict(unet.state_dict())  # strict: the same keys and shapes
    inputs = make_inputs(unet, size=(6, 10))
    time_ids = torch.tensor([[300, 500, 0, 20, 192, 320], [1024, 768, 64, 0, 320, 192]])
    added = inputs.pop("added_cond_kwargs", {}) | {"time_ids": time_ids}
    with torch.no_grad():
        ours = unet(**inputs, added_cond_kwargs=added)
        # diffusers always takes `text_embeds`: without a pooled text embedding, an empty one.
        theirs = twin(**inputs, added_cond_kwargs={"text_embeds": torch.zeros(2, 0)} | added)
    torch.testing.assert_close(ours.sample, theirs.sample, atol=1e-5, rtol=1e-5)


def test_size_conditioning_changes_the_prediction():
    unet = make_unet(addition_time_embed_dim=8).eval()
    inputs = make_inputs(unet)
    uncropped = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2)
    cropped = torch.tensor([[16, 32, 0, 8, 16, 16]] * 2)
    with torch.no_grad():
        first = unet(**inputs, added_cond_kwargs={"time_ids": uncropped}).sample
        again = unet(**inputs, added_cond_kwargs={"time_ids": uncropped.float()}).sample
        other = unet(**inputs, added_cond_kwargs={"time_ids": cropped}).sample
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other, atol=1e-4)


def test_size_conditioning_inputs_are_checked():
    unet = make_unet(addition_time_embed_dim=8)
    with pytest.raises(ValueError, match="`added_cond_kwargs=\\{'time_ids': time_ids\\}` must be passed exactly"):
        unet(**make_inputs(unet))
    with pytest.raises(ValueError, match="`time_ids` must have shape \\(2, 6\\), got \\(2, 4\\)"):
        unet(**make_inputs(unet), added_cond_kwargs={"time_ids": torch.zeros(2, 4)})
    plain = make_unet()
    with pytest.raises(ValueError, match="addition_time_embed_dim=None"):
        plain(**make_inputs(plain), added_cond_kwargs={"time_ids": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="`addition_time_embed_dim`=8 has no `UNet2DConditionModel` equivalent"):
        to_unet2d_condition_config(unet.config)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pipeline_conditions_on_the_output_size(guidance_scale):
    pipe = make_pipe()
    pipe.register_modules(unet=ConditionalUNet.from_config(pipe.unet.config, addition_time_embed_dim=8).eval())
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    prompts = ["a red circle", "a blue square"]
    pixels = pipe(
        prompts, height=12, width=20, guidance_scale=guidance_scale, num_inference_steps=2, output_type="pt"
    ).images
    assert pixels.shape == (2, 3, 12, 20) and torch.isfinite(pixels).all()
    rows = 4 if guidance_scale > 1 else 2  # both halves of a guided batch
    assert len(seen) == 2 and all(torch.equal(ids, torch.tensor([[12, 20, 0, 0, 12, 20]] * rows)) for ids in seen)


def test_training_loss_conditions_on_the_time_ids():
    unet = make_unet(addition_time_embed_dim=8).eval()
    inputs = make_inputs(unet, batch=2)
    latents, hidden = inputs["sample"], inputs["encoder_hidden_states"]
    scheduler, objective = DDPMNoiseScheduler(), Objective()
    time_ids = torch.tensor([[16, 32, 0, 8, 16, 16], [32, 16, 4, 0, 16, 16]])

    def loss(model, **kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return training_losses(model, scheduler, latents, hidden, None, objective, generator, **kwargs)[0]

    # Oracle: a U-Net called with the ids by hand.
    def with_ids(sample, timestep, encoder_hidden_states, **kwargs):
        return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"time_ids": time_ids})

    torch.testing.assert_close(loss(unet, time_ids=time_ids), loss(with_ids), rtol=0, atol=0)
    assert not torch.allclose(loss(unet, time_ids=time_ids), loss(unet, time_ids=time_ids.flip(0)))
