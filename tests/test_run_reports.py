"""What a training run reports besides its weights: images in the trackers (wandb in offline mode, read back with
wandb's own reader of its run file) and the model card of the saved pipeline. One tiny `train_ldm` run (2 steps,
validated at each, evaluated at the end) serves the tests that need one."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results
from test_training import ldm_args

from latentddpm.eval.report import METRICS
from latentddpm.pipelines.model_card import TrainingRecipe, write_training_model_card
from latentddpm.trackers import log_images
from latentddpm.training import train_ldm

PROMPTS = ["a red circle in the center", "a blue square in the top left"]
EVALUATION = (
    "data: shapes\nschedulers: [ddim]\nsteps: [2]\nguidance: [2.0]\nnum_samples: 4\nbatch_size: 4\n"
    "features: none\nshapes_num_images: 16\nreconstruction_samples: 8\ngrid_images: 4\n"
)


@pytest.fixture(scope="module")
def run(tiny_vae, tmp_path_factory) -> Path:
    """The output folder of a 2-step run logging to an offline wandb run in `run/../wandb`."""
    pytest.importorskip("wandb")
    tmp_path = tmp_path_factory.mktemp("reported")
    (tmp_path / "evaluation.yaml").write_text(EVALUATION)
    args = ["--validation_prompts", ",".join(PROMPTS), "--max_train_steps", "2", "--validation_steps", "1"]
    args += ["--evaluation_config", str(tmp_path / "evaluation.yaml"), "--report_to", "wandb"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.setenv("WANDB_SILENT", "true")
        return train_ldm.main(ldm_args(tiny_vae, tmp_path, *args))


def wandb_history(wandb_dir: Path) -> tuple[Path, list[dict]]:
    """The run folder of the one offline run under `wandb_dir` and its history rows (`_step` and the logged keys), as
    `wandb leet inspect --json` reads them from the run's `.wandb` file."""
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    history = [json.loads(line)["history"]["item"] for line in records if json.loads(line)["type"] == "history"]
    return run_file.parent, history


def logged_images(run_dir: Path, history: list[dict], key: str) -> dict[int, list[tuple[np.ndarray, str]]]:
    """`{step: [(pixels, caption), ...]}` of the images logged under `key`."""
    found = {}
    for row in history:
        if f"{key}.filenames" in row:
            files = row[f"{key}.filenames"]
            pixels = [np.asarray(PIL.Image.open(run_dir / "files" / name).convert("RGB")) for name in files]
            found[row["_step"]] = list(zip(pixels, row[f"{key}.captions"]))
    return found


def rgb(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_validation_and_evaluation_images_reach_wandb_with_their_prompts(run):
    run_dir, history = wandb_history(run.parent)

    # Validation: one image per prompt, captioned with it, the tiles of the saved grid (one row, in prompt order).
    validation = logged_images(run_dir, history, "validation")
    assert sorted(validation) == [1, 2]
    for step, logged in validation.items():
        assert [caption for _, caption in logged] == PROMPTS
        tiles = np.concatenate([pixels for pixels, _ in logged], axis=1)
        assert np.array_equal(tiles, rgb(run / "validation" / f"step-{step}.png"))
    # Evaluation (at the end only): each setting's sample grid, captioned with its prompts in reading order.
    results = json.loads((run / "evaluation" / "step-2" / "metrics.json").read_text())
    [row] = results["rows"]
    assert len(results["grid_prompts"]) == 4
    [(pixels, caption)] = logged_images(run_dir, history, "eval/ddim-2-cfg2/samples")[2]
    assert caption == " | ".join(results["grid_prompts"])
    assert np.array_equal(pixels, rgb(run / "evaluation" / "step-2" / row["grid"]))
    # Scalars still go through accelerate's tracker.
    assert any("eval/ddim-2-cfg2/all_acc" in row and row["_step"] == 2 for row in history)


def test_card_of_a_full_run_validates_with_its_recipe_grid_and_metrics(run):
    card = ModelCard.load(run / "README.md")  # parses the metadata, model-index included, or raises
    metadata = yaml.safe_load((run / "README.md").read_text().split("---\n")[1])
    assert isinstance(card.data, ModelCardData) and card.data.to_dict() == metadata
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "text-to-image" and "latentddpm" in metadata["tags"]
    assert "datasets" not in metadata and "base_model" not in metadata  # shapes is no Hub dataset; from scratch

    # model-index: huggingface_hub's own reader gives back one result per measured metric, with its sample count.
    results = json.loads((run / "evaluation" / "step-2" / "metrics.json").read_text())
    name, eval_results = model_index_to_eval_results(metadata["model-index"])
    assert name == run.name and eval_results == card.data.eval_results
    [row] = results["rows"]
    expected = {m: row[m] for m in METRICS if m in row and m != "seconds_per_image"}
    reconstruction = results["model_metrics"]["reconstruction"]
    expected |= {"psnr": reconstruction["psnr"], "ssim": reconstruction["ssim"]}
    assert {r.metric_type: r.metric_value for r in eval_results} == pytest.approx(expected)
    assert {r.metric_type for r in eval_results} >= {"all_acc", "color_acc", "psnr"}
    for result in eval_results:
        assert result.task_type == "text-to-image" and result.dataset_type == "shapes"
        # num_samples: 4 images per setting; reconstruction_samples: 8 images through the VAE (EVALUATION)
        assert result.metric_args["num_samples"] == (8 if result.metric_type in ("psnr", "ssim") else 4)

    # The recipe, the final validation grid and the metrics table are on the card.
    text = card.text
    for line in (
        "| Steps | 2 |",
        "| Batch size | 8 (8 per process x 1 accumulation steps x 1 processes) |",
        "| Learning rate | 0.001 (cosine schedule) |",
        "| Precision | fp32 |",
        "| Data | `shapes`, 88 images |",  # tiny_ldm.yaml: 96 images, 8 held out
        "| ddim | 2 | 2 | 4 |",
    ):
        assert line in text, line
    assert "| Hardware | 1 x CPU (" in text
    minutes = float(text.split("| Training time | ")[1].split(" minutes")[0])
    _, history = wandb_history(run.parent)
    logged = [row["train_minutes"] for row in history if row["_step"] == 2 and "train_minutes" in row]
    assert minutes == pytest.approx(logged[-1], rel=1e-2)
    assert "![samples](sample_grid.png)" in text
    assert np.array_equal(rgb(run / "sample_grid.png"), rgb(run / "validation" / "step-2.png"))


def test_card_metadata_names_hub_base_models_and_datasets_only(tmp_path):
    recipe = dict(
        num_images=10, steps=5, max_train_steps=10, train_batch_size=2, gradient_accumulation_steps=4,
        num_processes=2, learning_rate=1e-4, lr_scheduler="constant", mixed_precision="bf16",
        hardware="2 x NVIDIA H200", train_minutes=3.0,
    )  # fmt: skip
    local = tmp_path / "local"
    local.mkdir()
    write_training_model_card(local, TrainingRecipe(dataset="user/pairs", base_model="org/base", **recipe))
    metadata = ModelCard.load(local / "README.md").data
    assert metadata.datasets == ["user/pairs"] and metadata.base_model == "org/base"
    assert metadata.eval_results is None and "model-index" not in metadata.to_dict()
    text = (local / "README.md").read_text()
    assert "| Steps | 5 of 10 |" in text and "| Precision | bf16 mixed precision |" in text
    assert "| Batch size | 16 (2 per process x 4 accumulation steps x 2 processes) |" in text

    write_training_model_card(local, TrainingRecipe(dataset=str(local), base_model=str(local), **recipe))
    metadata = ModelCard.load(local / "README.md").data
    assert metadata.datasets is None and metadata.base_model is None  # local paths: on the card's text only
    assert f"| Base model | `{local}` |" in (local / "README.md").read_text()


def test_tensorboard_gets_the_images_as_one_strip_and_captions_must_match(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(
        log_with="tensorboard", project_config=ProjectConfiguration(tmp_path, logging_dir=tmp_path / "logs")
    )
    accelerator.init_trackers("images")
    images = [PIL.Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    with pytest.raises(ValueError, match="one caption per image, got 1 for 2 images"):
        log_images(accelerator, "validation", images, ["a red square"], step=3)
    log_images(accelerator, "validation", images, ["a red square", "a blue square"], step=3)
    accelerator.end_training()

    [event_file] = (tmp_path / "logs").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    [image] = events.Images("validation")
    strip = np.asarray(PIL.Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert image.step == 3 and np.array_equal(strip, np.concatenate([np.asarray(i) for i in images], axis=1))
