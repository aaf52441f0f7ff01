"""`latentddpm evaluate` (`latentddpm.eval.sweep.main`) on a tiny saved pipeline: the ConditionalUNet of
configs/unet/tiny.json, a tiny AutoencoderKL (16x16 images, 8x8 latents), a tiny BERT with the all-MiniLM tokenizer and
our DDPMNoiseScheduler."""

import csv
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from latentddpm.config import ConfigError
from latentddpm.data import COLORS, make_shapes_dataset, shapes_prompts
from latentddpm.eval import train_classifier
from latentddpm.eval.clip_score import CLIPScorer
from latentddpm.eval.features import CLASSIFIER_DESCRIPTION
from latentddpm.eval.sampling import generate_images, grid_shape, to_pil
from latentddpm.eval.sweep import EvaluateConfig, evaluate, main
from latentddpm.models import ConditionalUNet
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.text import default_text_encoder_path

UNET_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "unet" / "tiny.json"
SWEEP = ["--guidance", "1,3", "--steps", "2,3", "--schedulers", "ddpm,ddim", "--num_samples", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    tokenizer.model_max_length = 12
    text_encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    unet = ConditionalUNet.from_config(ConditionalUNet.load_config(UNET_CONFIG))  # cross_attention_dim 32
    pipeline = LatentDDPMPipeline(vae, text_encoder, tokenizer, unet, DDPMNoiseScheduler())
    path = tmp_path_factory.mktemp("pipeline")
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_run(model_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-shapes")
    main(
        ["--model", str(model_path), "--data", "shapes", *SWEEP, "--out", str(out), "--features", "none"]
        + ["--shapes_num_images", "8", "--reconstruction_samples", "4"]
        + ["--likelihood_samples", "2", "--likelihood_stride", "250"]
    )
    return out


def test_evaluate_on_shapes_writes_a_row_per_setting_to_csv_and_json(shapes_run):
    with open(shapes_run / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    settings = {(row["scheduler"], int(row["steps"]), float(row["guidance"])) for row in rows}
    assert len(rows) == 8 and settings == set(itertools.product(["ddpm", "ddim"], [2, 3], [1.0, 3.0]))
    for row in rows:
        for key in ("all_acc", "color_acc", "shape_acc", "position_acc"):
            assert 0 <= float(row[key]) <= 1
        assert float(row["seconds_per_image"]) > 0 and "fid" not in row

    results = json.loads((shapes_run / "metrics.json").read_text())
    assert [(r["scheduler"], r["steps"], r["guidance"]) for r in results["rows"]] == [
        (s, n, g) for s, n, g in itertools.product(["ddpm", "ddim"], [2, 3], [1.0, 3.0])
    ]
    assert results["data_kind"] == "shapes" and results["features"] is None
    reconstruction, likelihood = results["model_metrics"]["reconstruction"], results["model_metrics"]["likelihood"]
    assert reconstruction["n"] == 4 and reconstruction["scaling_factor"] == 0.5 and reconstruction["psnr"] > 0
    assert likelihood["n"] == 2 and likelihood["stride"] == 250 and likelihood["latent_bpd"] > 0
    assert "latent-space bits/dim" in likelihood["note"]
    assert results["machine"]["torch"] == torch.__version__


def test_evaluate_writes_plots_grids_and_a_self_contained_report(shapes_run):
    for metric in ("all_acc", "color_acc", "shape_acc", "position_acc", "seconds_per_image"):
        assert (shapes_run / "plots" / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"
    grids = sorted(path.name for path in (shapes_run / "grids").glob("*.png"))
    assert len(grids) == 8 and "ddim-steps3-cfg3.png" in grids
    report = (shapes_run / "report.html").read_text()
    # every image inline: 5 plots + 8 grids, and no reference to any file
    assert report.count('src="data:image/png;base64,') == 13
    assert not re.search(r'src="(?!data:)', report) and "No feature network" in report


def one_setting(model_path: Path, out: Path, steps: int, **overrides) -> EvaluateConfig:
    """A single DDIM setting on 4 shapes prompts, no FID, no reconstruction."""
    return EvaluateConfig(
        model=str(model_path),
        data="shapes",
        guidance=[3.0],
        steps=[steps],
        schedulers=["ddim"],
        num_samples=4,
        out=str(out),
        features="none",
        shapes_num_images=8,
        reconstruction_samples=0,
        **overrides,
    )


def test_evaluate_is_deterministic_for_a_seed_whatever_else_is_swept(model_path, shapes_run, tmp_path):
    out = tmp_path / "again"
    (row,) = evaluate(one_setting(model_path, out, steps=3))["rows"]
    first = next(r for r in json.loads((shapes_run / "metrics.json").read_text())["rows"] if r["grid"] == row["grid"])
    assert {k: v for k, v in row.items() if k != "seconds_per_image"} == {
        k: v for k, v in first.items() if k != "seconds_per_image"
    }
    assert (out / row["grid"]).read_bytes() == (shapes_run / row["grid"]).read_bytes()


def colors_parquet(path: Path) -> Path:
    """Shapes images captioned and labelled by colour only: class-captioned data like CIFAR-10's."""
    dataset = make_shapes_dataset(60, size=16)
    dataset = dataset.map(lambda row: {"text": f"a photo of a {row['color']} thing"})
    dataset = dataset.cast_column("color", ClassLabel(names=list(COLORS))).rename_column("color", "label")
    dataset.to_parquet(path)
    return path


def test_evaluate_on_class_captioned_data_reports_class_accuracy_and_labelled_fid_kid(model_path, tmp_path):
    data = colors_parquet(tmp_path / "colors.parquet")
    classifier = ["--dataset", str(data), "--output_dir", str(tmp_path / "classifier"), "--resolution", "16"]
    classifier += ["--max_train_steps", "3", "--train_batch_size", "8", "--num_heldout", "10"]
    train_classifier.main(classifier + ["--block_out_channels", "8,16", "--feature_dim", "8"])
    args = ["--model", str(model_path), "--data", str(data), "--guidance", "1,3", "--steps", "2"]
    args += ["--schedulers", "ddpm", "--num_samples", "6", "--classifier", str(tmp_path / "classifier")]
    args += ["--cache_dir", str(tmp_path / "cache"), "--reconstruction_samples", "0", "--out", str(tmp_path / "out")]
    main(args)

    results = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert results["data_kind"] == "class" and results["features"] == CLASSIFIER_DESCRIPTION
    assert results["num_reference"] == 60 and len(results["rows"]) == 2
    for row in results["rows"]:
        assert row["class_acc"] in {i / 6 for i in range(7)}  # one image per colour
        assert row["fid"] > 0 and row["kid_std"] >= 0 and "all_acc" not in row
    assert len(list((tmp_path / "cache").glob("reference-classifier-*.safetensors"))) == 1
    report = (tmp_path / "out" / "report.html").read_text()
    assert "classifier features (not comparable to published FID)" in report
    assert {p.name for p in (tmp_path / "out" / "plots").glob("*.png")} >= {"class_acc.png", "fid.png", "kid.png"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--schedulers", "ddpm,heun"], r"'schedulers' has \['heun'\]"),
        (["--steps", "0"], "'steps' must be positive"),
        (["--num-samples", "0"], "'num_samples' must be > 0"),  # a dash alias
        (["--guidanse", "2"], "Did you mean 'guidance'"),
    ],
)
def test_bad_evaluate_arguments_raise_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        main(["--model", "unused", *args])


def test_evaluate_needs_a_model():
    with pytest.raises(ConfigError, match="'model' is required"):
        main(["--data", "shapes"])


# --- CLIP score ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random tiny CLIPModel saved with a tokenizer (all-MiniLM's, [SEP] as end of text) and a 32px image processor:
    nothing CLIP-sized is on disk offline, and the score's arithmetic does not depend on the weights."""
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=24, eos_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_is_100_times_the_clamped_cosine_of_the_projected_embeddings(tiny_clip):
    scorer = CLIPScorer(tiny_clip)
    # 8-bit values: the image processor's resize goes through PIL, which would round anything else
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(0)) / 255
    prompts = ["a red circle", "a green square in the center", "a cat", "", "a blue triangle in the top left"]
    scores = scorer.scores(images, prompts, batch_size=2)

    # by hand: CLIP's normalisation of the pixels, the projected pooled outputs, their cosine
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = scorer.model.get_image_features(pixel_values=(images - mean) / std).pooler_output
        text_embeds = scorer.model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), rtol=1e-4, atol=1e-3)
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 100)).all()
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer.scores(images, prompts[:4])


def test_evaluate_adds_the_clip_score_when_given_a_clip_model(model_path, tiny_clip, tmp_path):
    (row,) = evaluate(one_setting(model_path, tmp_path, steps=2, clip_model=str(tiny_clip)))["rows"]
    assert 0 <= row["clip_score"] <= 100
    assert (tmp_path / "plots" / "clip_score.png").is_file()


# --- sampling for evaluation -----------------------------------------------------------------------------------------


def test_generate_images_seeds_each_batch_with_a_cpu_generator_at_its_first_index(model_path):
    pipeline = LatentDDPMPipeline.from_pretrained(model_path)
    pipeline.set_progress_bar_config(disable=True)
    prompts = shapes_prompts()[:3]
    images = generate_images(pipeline, prompts, num_inference_steps=2, guidance_scale=3.0, seed=5, batch_size=2)

    def direct(batch, seed, output_type="pt"):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipeline(batch, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type=output_type)

    expected = torch.cat([direct(prompts[:2], 5).images, direct(prompts[2:], 7).images])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    # as the pipeline's own 8-bit PIL output
    pil = direct(prompts[:2], 5, output_type="pil").images
    assert [image.tobytes() for image in to_pil(images[:2])] == [image.tobytes() for image in pil]


@pytest.mark.parametrize("num_images, shape", [(1, (1, 1)), (4, (2, 2)), (5, (1, 5)), (64, (8, 8)), (90, (9, 10))])
def test_grid_shape_is_the_most_square_grid_the_images_fill(num_images, shape):
    assert grid_shape(num_images) == shape
