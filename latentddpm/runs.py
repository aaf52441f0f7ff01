"""What every training script shares: the start (Accelerator, logging, threads, seeds, the saved config) and the
run's bookkeeping (its counters, resume, periodic checkpoints, preemption and the non-finite-gradient guard)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType

from .checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint, stop_on_signals
from .config import save_config
from .hub import HubUploader, hub_checkpoint
from .nonfinite import NonFiniteGuard
from .optional import import_optional
from .threads import choose_torch_threads

logger = get_logger(__name__)
LR_SCHEDULERS = [s.value for s in SchedulerType]  # the `lr_scheduler` names diffusers' get_scheduler takes


# The Accelerator settings that `accelerate config` and `accelerate launch` own, with the environment variable through
# which the launcher hands each one to the script.
ACCELERATE_SETTINGS = {
    "mixed_precision": "ACCELERATE_MIXED_PRECISION",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "dynamo_backend": "ACCELERATE_DYNAMO_BACKEND",
}


def start_run(config, **accelerate_settings) -> Accelerator:
    """Set up a training run from its config (`output_dir`, `mixed_precision`, `report_to`, `torch_threads`,
    `adapt_torch_threads`, `seed`).

    accelerate owns mixed precision, gradient accumulation, the dynamo backend and the FSDP/DeepSpeed plugins: each
    comes from `accelerate config` and `accelerate launch`'s flags unless the training config sets it (not None), and
    the log says where each came from. `accelerate_settings` are the script's other keys of `ACCELERATE_SETTINGS`
    (`gradient_accumulation_steps`, `dynamo_backend`; None = accelerate's). Trackers log to `output_dir/logs`. The
    scripts step the LR scheduler once per optimizer step themselves, whatever the number of processes, so accelerate
    is told not to. The config is saved to `output_dir/train_config.yaml`.
    """
    output_dir = Path(config.output_dir)
    if config.report_to == "tensorboard":  # accelerate would drop the tracker silently and log nothing
        import_optional("tensorboard", extra="train", feature="report_to='tensorboard'")
    settings = {"mixed_precision": config.mixed_precision} | accelerate_settings
    # An explicit argument beats accelerate's config and launcher, so only what the training config sets is passed.
    accelerator = Accelerator(
        **{name: value for name, value in settings.items() if value is not None},
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    resolved = {
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "dynamo_backend": accelerator.state.dynamo_plugin.backend.value.lower(),
    }
    for name, value in settings.items():
        logger.info(f"{name}={resolved[name]} (from {setting_source(name, value)})")
    # FSDP and DeepSpeed plugins are accelerate's alone (`accelerate config`): our configs have no key for them.
    logger.info(f"distributed_type={accelerator.distributed_type.value} (from accelerate launch / accelerate config)")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    elif config.adapt_torch_threads and accelerator.device.type == "cpu":
        threads, reason = choose_torch_threads()
        torch.set_num_threads(threads)
        logger.info(f"torch threads: {threads} ({reason})")
    set_seed(config.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "train_config.yaml")
    return accelerator


def setting_source(name: str, configured) -> str:
    """Where the Accelerator setting `name` (a key of `ACCELERATE_SETTINGS`) came from: the training config
    (`configured` is not None), `accelerate launch` (its flags, or the `accelerate config` file it reads, reach the
    script as an `ACCELERATE_*` variable), or accelerate's default."""
    if configured is not None:
        return "the training config"
    if os.environ.get(ACCELERATE_SETTINGS[name]) is not None:
        return f"accelerate launch / accelerate config, {ACCELERATE_SETTINGS[name]}"
    return "accelerate's default"


class Preempted(Exception):
    """A training loop saved a checkpoint on SIGTERM/SIGINT and stopped early; the command line exits 0 on it."""


def checkpoint_dir(config) -> Path:
    return Path(config.output_dir) / "checkpoints"


def find_checkpoint(config) -> Path | None:
    """The checkpoint `config.resume_from_checkpoint` names (None: start afresh): `latest`, a folder, or a Hub repo
    id, whose `last-checkpoint/` is downloaded. Call it before loading anything, so that a wrong path fails in
    seconds."""
    return resolve_checkpoint(checkpoint_dir(config), hub_checkpoint(config.resume_from_checkpoint))


@dataclasses.dataclass
class RunState:
    """The counters a run carries across checkpoints (`training_state.json`)."""

    global_step: int = 0  # optimizer steps taken (or skipped) so far
    skipped_steps: int = 0  # of which skipped for non-finite gradients
    train_seconds: float = 0.0  # time in training steps, without validation and checkpointing


class TrainingRun(contextlib.AbstractContextManager):
    """Resume, periodic checkpoints, preemption and the non-finite-gradient guard of one training run.

    accelerate saves and restores what `accelerator.prepare` wrapped (models, optimizers, LR schedulers) and the RNG
    states; `write_extra(folder)` adds the script's own files (EMA weights, config, manifest) to every checkpoint. As
    a context manager around the loop it records SIGTERM/SIGINT (sent by schedulers before they kill a job), and
    `checkpoint_if_due` then saves and raises `Preempted` at the end of the step they arrived in. An `uploader`
    (see `latentddpm.hub.HubUploader`) is handed every checkpoint on the main process, to commit it to the Hub.
    """

    def __init__(self, accelerator, config, write_extra: Callable[[Path], None], uploader: HubUploader | None = None):
        self.accelerator = accelerator
        self.directory = checkpoint_dir(config)
        self.checkpointing_steps = config.checkpointing_steps
        self.total_limit = config.checkpoints_total_limit
        self.write_extra = write_extra
        self.uploader = uploader
        self.state = RunState()
        self.guard = NonFiniteGuard(config.max_consecutive_nonfinite, self.directory)
        self._signals = stop_on_signals()
        self._received: list[int] = []

    def resume(self, checkpoint: Path | None) -> None:
        """Restore accelerate's states and the counters from `checkpoint` (a fresh start when None)."""
        if checkpoint is None:
            return
        self.state = RunState(**load_checkpoint(self.accelerator, checkpoint))
        self.guard.skipped = self.state.skipped_steps
        logger.info(f"Resumed from {checkpoint} at step {self.state.global_step}")

    def should_step(self, grad_norm) -> bool:
        """Whether the optimizer may step on this (all-reduced) gradient norm; non-finite ones are skipped, counted."""
        stepped = self.guard.should_step(grad_norm, self.state.global_step)
        self.state.skipped_steps = self.guard.skipped
        return stepped

    def save(self) -> Path:
        path = save_checkpoint(
            self.accelerator,
            self.directory,
            self.state.global_step,
            dataclasses.asdict(self.state),
            write_extra=self.write_extra,
            total_limit=self.total_limit,
        )
        if self.uploader is not None and self.accelerator.is_main_process:
            self.uploader.push_checkpoint(path, self.state.global_step)
        return path

    def checkpoint_if_due(self) -> None:
        """Save every `checkpointing_steps` steps; after a preemption signal, save and raise `Preempted`."""
        if self._received:
            path = self.save()
            if self.uploader is not None and self.accelerator.is_main_process:
                self.uploader.wait()  # the job may be gone soon: its last checkpoint on the Hub lets another resume
            self.accelerator.print(
                f"Received signal {self._received[0]} at step {self.state.global_step}: saved {path}. Resume with "
                "--resume_from_checkpoint latest (same output_dir)."
            )
            self.accelerator.end_training()
            raise Preempted(f"stopped at step {self.state.global_step} by signal {self._received[0]}")
        if self.checkpointing_steps and self.state.global_step % self.checkpointing_steps == 0:
            self.save()

    def __enter__(self) -> TrainingRun:
        self._received = self._signals.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._signals.__exit__(*exc_info)
