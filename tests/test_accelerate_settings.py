"""`accelerate launch`'s flags reach the training loop unless the training config sets the same thing (issue 15).

The launched module is this file: run as `python -m test_accelerate_settings`, it records the dtype of every U-Net
output (the activations autocast produces) and then runs `latentddpm.training.train_ldm` as `python -m` would.
"""

import json
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_training import ldm_args

from latentddpm.models import ConditionalUNet
from latentddpm.runs import start_run

OBSERVATIONS = "LATENTDDPM_TEST_OBSERVATIONS"  # env var: the JSON file the launched run writes the dtypes to


@dataclass
class RunConfig:
    """The keys `start_run` reads."""

    output_dir: str
    mixed_precision: str | None = None
    report_to: str = "none"
    torch_threads: int | None = None
    adapt_torch_threads: bool = False
    seed: int = 0


def launch_bf16(args: list[str], observations: Path) -> str:
    """`accelerate launch --cpu --num_processes 1 --mixed_precision bf16` this module; returns the run's log."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--cpu", "--num_processes", "1", "--mixed_precision", "bf16",
        "-m", "test_accelerate_settings", *args,
    ]  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        OBSERVATIONS: str(observations),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_launcher_mixed_precision_reaches_the_training_loop(tiny_vae, tmp_path):
    observations = tmp_path / "dtypes.json"
    log = launch_bf16(ldm_args(tiny_vae, tmp_path, "--max_train_steps", "2"), observations)
    assert "mixed_precision=bf16 (from accelerate launch / accelerate config, ACCELERATE_MIXED_PRECISION)" in log
    assert set(json.loads(observations.read_text())) == {"torch.bfloat16"}


@pytest.mark.slow
def test_config_mixed_precision_beats_the_launcher_and_says_so(tiny_vae, tmp_path):
    observations = tmp_path / "dtypes.json"
    log = launch_bf16(ldm_args(tiny_vae, tmp_path, "--max_train_steps", "2", "--mixed_precision", "no"), observations)
    assert "mixed_precision=no (from the training config)" in log
    assert set(json.loads(observations.read_text())) == {"torch.float32"}


def test_unset_settings_are_accelerates_and_set_ones_are_the_configs(tmp_path, monkeypatch, caplog):
    # What `accelerate launch --mixed_precision bf16 --dynamo_backend no` hands the script; no accumulation flag.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    config = RunConfig(output_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="latentddpm.runs"):
        accelerator = start_run(config, gradient_accumulation_steps=3, dynamo_backend=None)
    assert (accelerator.mixed_precision, accelerator.gradient_accumulation_steps) == ("bf16", 3)
    with accelerator.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    assert "gradient_accumulation_steps=3 (from the training config)" in caplog.text
    assert "dynamo_backend=no (from accelerate launch / accelerate config, ACCELERATE_DYNAMO_BACKEND)" in caplog.text


def run_observed_training() -> None:
    """`python -m latentddpm.training.train_ldm`, recording the dtype of each U-Net output to the JSON file."""
    dtypes = set()
    forward = ConditionalUNet.forward

    def observed_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        sample = output[0] if isinstance(output, tuple) else output.sample
        if torch.is_grad_enabled():  # training steps, not the final validation's sampling
            dtypes.add(str(sample.dtype))
        return output

    ConditionalUNet.forward = observed_forward
    runpy.run_module("latentddpm.training.train_ldm", run_name="__main__", alter_sys=True)
    Path(os.environ[OBSERVATIONS]).write_text(json.dumps(sorted(dtypes)))


if __name__ == "__main__":
    run_observed_training()
