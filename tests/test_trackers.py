"""Images in the experiment trackers: a tiny `train_ldm` run logging to wandb (offline), read back with wandb's own
reader of its run file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_training import ldm_args

from latentddpm.training import train_ldm

pytest.importorskip("wandb")

PROMPTS = ["a red circle in the center", "a blue square in the top left"]


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
            files = [
                np.asarray(PIL.Image.open(run_dir / "files" / name).convert("RGB")) for name in row[f"{key}.filenames"]
            ]
            found[row["_step"]] = list(zip(files, row[f"{key}.captions"]))
    return found


def test_validation_and_evaluation_images_reach_wandb_with_their_prompts(tiny_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    evaluation = tmp_path / "evaluation.yaml"
    evaluation.write_text(
        "data: shapes\nschedulers: [ddim]\nsteps: [2]\nguidance: [2.0]\nnum_samples: 4\nbatch_size: 4\n"
        "features: none\nshapes_num_images: 16\nreconstruction_samples: 0\ngrid_images: 4\n"
    )
    args = ["--validation_prompts", ",".join(PROMPTS), "--max_train_steps", "2", "--validation_steps", "1"]
    args += ["--evaluation_config", str(evaluation), "--report_to", "wandb"]
    out = train_ldm.main(ldm_args(tiny_vae, tmp_path, *args))
    run_dir, history = wandb_history(tmp_path)

    # Validation: one image per prompt, captioned with it, the tiles of the saved grid (one row, in prompt order).
    validation = logged_images(run_dir, history, "validation")
    assert sorted(validation) == [1, 2]
    for step, logged in validation.items():
        grid = np.asarray(PIL.Image.open(out / "validation" / f"step-{step}.png").convert("RGB"))
        assert [caption for _, caption in logged] == PROMPTS
        assert np.array_equal(np.concatenate([pixels for pixels, _ in logged], axis=1), grid)
    # Evaluation (at the end only): each setting's sample grid, captioned with its prompts in reading order.
    results = json.loads((out / "evaluation" / "step-2" / "metrics.json").read_text())
    [(row,)] = [results["rows"]]
    assert len(results["grid_prompts"]) == 4
    [(pixels, caption)] = logged_images(run_dir, history, "eval/ddim-2-cfg2/samples")[2]
    assert caption == " | ".join(results["grid_prompts"])
    assert np.array_equal(
        pixels, np.asarray(PIL.Image.open(out / "evaluation" / "step-2" / row["grid"]).convert("RGB"))
    )
    # Scalars still go through accelerate's tracker.
    assert any("eval/ddim-2-cfg2/all_acc" in row and row["_step"] == 2 for row in history)
