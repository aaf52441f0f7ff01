"""Skip optimizer steps with NaN/inf gradients, and stop a run that keeps producing them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpointing import resolve_checkpoint

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Decides, from the (all-reduced) gradient norm, whether an optimizer step may be taken.

    A step whose gradient norm is not finite is skipped and counted; `max_consecutive` skipped steps in a row raise
    a `RuntimeError` naming the step and the last good checkpoint. The norm is the same on every process after the
    all-reduce, so all processes skip together.
    """

    def __init__(self, max_consecutive: int, checkpoint_dir: str | Path, skipped: int = 0):
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.skipped = skipped  # over the whole run; saved in checkpoints
        self.consecutive = 0

    def should_step(self, grad_norm: torch.Tensor, step: int) -> bool:
        if torch.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        logger.warning(f"Step {step}: non-finite gradients, update skipped ({self.skipped} so far)")
        if self.consecutive >= self.max_consecutive:
            last = resolve_checkpoint(self.checkpoint_dir, "latest")
            raise RuntimeError(
                f"Stopping at step {step}: {self.consecutive} steps in a row had non-finite loss or gradients. "
                f"Last good checkpoint: {last or 'none'}. Lower learning_rate, enable max_grad_norm or use bf16 "
                "instead of fp16, then resume from it."
            )
        return False
