"""What every training script does first: the Accelerator, logging, threads, seeds and the run's saved config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from .config import save_config
from .optional import import_optional

logger = get_logger(__name__)


def start_run(config) -> Accelerator:
    """Set up a training run from its config (`output_dir`, `mixed_precision`, `report_to`, `torch_threads`, `seed`).

    Trackers log to `output_dir/logs`. The scripts step the LR scheduler once per optimizer step themselves, whatever
    the number of processes, so accelerate is told not to. The config is saved to `output_dir/train_config.yaml`.
    """
    output_dir = Path(config.output_dir)
    if config.report_to == "tensorboard":  # accelerate would drop the tracker silently and log nothing
        import_optional("tensorboard", extra="train", feature="report_to='tensorboard'")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    set_seed(config.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "train_config.yaml")
    return accelerator
