"""A 2-process CPU run of train_ldm under `accelerate launch`: DDP over gloo, the LR schedule and the data split.

`accelerate launch --cpu --num_processes 2` starts a single process (multi-CPU launches go through `mpirun`,
huggingface/accelerate#2741), so the test launches with torchrun (`--multi_gpu`) and `ACCELERATE_USE_CPU=true`,
which makes every `Accelerator` a `MULTI_CPU` process group on the gloo backend.

The launched module is this file: run as `python -m test_multiprocess`, it wraps two library calls with observers
that record what each process did (the rows it trained on, a digest of its U-Net weights after each step) and then
runs `latentddpm.training.train_ldm` exactly as `python -m latentddpm.training.train_ldm` would.
"""

import hashlib
import json
import math
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import ldm_args

from latentddpm import LatentDDPMPipeline
from latentddpm.batching import ShuffledStream
from latentddpm.text import default_text_encoder_path

NUM_PROCESSES = 2
BATCH_PER_PROCESS = 8
MAX_TRAIN_STEPS = 6
LR_WARMUP_STEPS = 2
LEARNING_RATE = 1e-3
NUM_TRAINING_ROWS = 88  # shapes_num_images 96 minus num_validation_samples 8 (see `ldm_args`)
OBSERVATIONS = "LATENTDDPM_TEST_OBSERVATIONS"  # env var: the folder where each rank writes what it saw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights_digest(parameters: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def launch(module: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """`accelerate launch` `module` on NUM_PROCESSES CPU processes (gloo); fails the test unless it exits 0."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", module, *args,
    ]  # fmt: skip
    env = os.environ | {
        "ACCELERATE_USE_CPU": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # one core per process; more only oversubscribes the CPU
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]


def expected_learning_rates(name: str, num_steps: int, num_warmup_steps: int) -> list[float]:
    """The LR after each of `num_steps` optimizer steps, from diffusers' `get_scheduler` in a single process."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LEARNING_RATE)
    scheduler = get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_steps
    )
    rates = []
    for _ in range(num_steps):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return rates


def test_two_process_cpu_run_splits_batches_syncs_weights_and_keeps_the_lr_schedule(tiny_vae, tmp_path):
    observations = tmp_path / "observations"
    observations.mkdir()
    args = ldm_args(
        tiny_vae,
        tmp_path,
        "--train_batch_size", str(BATCH_PER_PROCESS),
        "--max_train_steps", str(MAX_TRAIN_STEPS),
        "--learning_rate", str(LEARNING_RATE),
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", str(LR_WARMUP_STEPS),
        "--report_to", "tensorboard",
        "--log_every", "1",
        "--dataloader_num_workers", "0",  # the rows are drawn in the training process, where they are observed
    )  # fmt: skip
    launch("test_multiprocess", args, {OBSERVATIONS: str(observations)})

    ranks = [json.loads((observations / f"rank-{r}.json").read_text()) for r in range(NUM_PROCESSES)]
    assert [(r["num_processes"], r["backend"], r["process_index"]) for r in ranks] == [(2, "gloo", 0), (2, "gloo", 1)]

    # Each process trains on its own slice of the global batch: together they see what one process with a batch of
    # 2 x 8 would, and no row twice within the first epoch (5 steps x 16 rows of the 88 training rows).
    single = ShuffledStream(NUM_TRAINING_ROWS, BATCH_PER_PROCESS * NUM_PROCESSES, num_processes=1, seed=0)
    for rank in ranks:
        assert [step for step, _ in rank["rows"]] == list(range(MAX_TRAIN_STEPS))
    for step in range(MAX_TRAIN_STEPS):
        both = ranks[0]["rows"][step][1] + ranks[1]["rows"][step][1]
        assert both == single.indices(step).tolist(), step
    first_epoch = [row for step in range(5) for rank in ranks for row in rank["rows"][step][1]]
    assert len(set(first_epoch)) == len(first_epoch) == 80

    # DDP all-reduces the gradients, so the two replicas stay identical after every optimizer step.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert len(set(ranks[0]["weights"])) == MAX_TRAIN_STEPS  # and they did change at every step

    # The LR advances once per optimizer step, not once per process.
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "latentddpm"))
    events.Reload()
    logged_lr = [(e.step, e.value) for e in events.Scalars("lr")]
    expected = expected_learning_rates("cosine", MAX_TRAIN_STEPS, LR_WARMUP_STEPS)
    assert [step for step, _ in logged_lr] == list(range(1, MAX_TRAIN_STEPS + 1))
    assert [value for _, value in logged_lr] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(e.value) for e in events.Scalars("loss"))

    pipe = LatentDDPMPipeline.from_pretrained(str(tmp_path / "run"))
    image = pipe("a blue square in the top left", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_two_process_run_training_the_text_encoder_accumulates_validates_and_saves_it(tiny_vae, tmp_path):
    # BERT's pooler gets no gradient (DDP would fail at step 2 if it were trained), and validation on the main process
    # alone must not run the DDP-wrapped encoder (its buffer broadcast would wait for the other process forever).
    args = ldm_args(
        tiny_vae,
        tmp_path,
        "--train_text_encoder", "true",
        "--text_encoder_learning_rate", "1e-4",
        "--gradient_accumulation_steps", "2",
        "--max_train_steps", "4",
        "--validation_steps", "2",
    )  # fmt: skip
    launch("latentddpm.training.train_ldm", args, timeout=300)

    pretrained = load_file(str(Path(default_text_encoder_path()) / "model.safetensors"))
    trained = load_file(str(tmp_path / "run" / "text_encoder" / "model.safetensors"))
    changed = {k for k in trained if not torch.equal(trained[k], pretrained[k])}
    assert changed and not any(k.startswith("pooler.") for k in changed)
    assert (tmp_path / "run" / "validation" / "step-2.png").is_file()
    pipe = LatentDDPMPipeline.from_pretrained(str(tmp_path / "run"))
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def run_observed_training() -> None:
    """`python -m latentddpm.training.train_ldm`, with observers that write what this process saw as JSON."""
    from accelerate import PartialState

    from latentddpm.ema import ShardedEMAModel

    rows, weights = [], []
    indices, ema_step = ShuffledStream.indices, ShardedEMAModel.step

    def observed_indices(self, micro_step, process_index=0):
        out = indices(self, micro_step, process_index)
        rows.append((micro_step, out.tolist()))
        return out

    def observed_ema_step(self, parameters):
        # Called once per optimizer step with the live U-Net parameters of this process.
        parameters = list(parameters)
        weights.append(_weights_digest(parameters))
        return ema_step(self, parameters)

    ShuffledStream.indices, ShardedEMAModel.step = observed_indices, observed_ema_step
    runpy.run_module("latentddpm.training.train_ldm", run_name="__main__", alter_sys=True)
    state = PartialState()
    record = {
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "backend": state.backend,
        "rows": rows,
        "weights": weights,
    }
    Path(os.environ[OBSERVATIONS], f"rank-{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run_observed_training()
