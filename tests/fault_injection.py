"""Run `train_ldm` and stop it at a chosen point, for tests/test_reliability.py to send it a signal there.

Usage (what `run_until_fault` in the tests does):

    LATENTDDPM_TEST_FAULT=WHERE:AT python tests/fault_injection.py TRAIN_LDM_ARGS...

WHERE is one of `FAULTS`; AT is a step (0-based, for `step`) or the step of the checkpoint being saved. At that
point the run prints `FAULT POINT WHERE:AT` and waits for SIGTERM or SIGINT (then handled by the run's own handler,
and the run goes on) or SIGKILL.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import accelerate.checkpointing

from latentddpm import losses
from latentddpm.cli import run_main
from latentddpm.training import train_ldm

FAULT_ENV = "LATENTDDPM_TEST_FAULT"
SEED_ENV = "LATENTDDPM_TEST_FAULT_SEED"


def pick_step(low: int, high: int) -> int:
    """A step in [low, high] drawn with the seed in `$LATENTDDPM_TEST_FAULT_SEED` (0 if unset), printed so that a
    failing draw can be run again."""
    seed = int(os.environ.get(SEED_ENV, "0"))
    step = random.Random(seed).randint(low, high)
    print(f"fault injection: step {step} (0-based) drawn from [{low}, {high}] with {SEED_ENV}={seed}")
    return step


def stop_here(where: str, at: int) -> None:
    """Print the marker and wait for the test's signal."""
    # Note the signal (then pass it to the run's own handler) from before the marker is printed, so that none is
    # missed; SIGKILL ends the process in the wait.
    arrived, handlers = [], {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(signum, frame):
        arrived.append(signum)
        handlers[signum](signum, frame)

    for signum in handlers:
        signal.signal(signum, note)
    print(f"FAULT POINT {where}:{at}", flush=True)
    while not arrived:
        time.sleep(0.01)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def stop_in_step(at: int) -> None:
    """Inside the forward pass of step `at` (0-based)."""
    diffusion_loss, calls = losses.diffusion_loss, []

    def counting_loss(*args, **kwargs):
        if len(calls) == at:
            stop_here("step", at)
        calls.append(None)
        return diffusion_loss(*args, **kwargs)

    losses.diffusion_loss = counting_loss  # what `training_losses` calls


def stop_in_save_state(at: int) -> None:
    """Saving checkpoint-`at`: model weights written, optimizer state not yet."""
    save = accelerate.checkpointing.save

    def stopping_save(obj, f, *args, **kwargs):
        if Path(f).parent.name == f".tmp-checkpoint-{at}" and Path(f).name == "optimizer.bin":
            stop_here("save_state", at)
        return save(obj, f, *args, **kwargs)

    accelerate.checkpointing.save = stopping_save


def stop_before_rename(at: int) -> None:
    """Checkpoint-`at` complete in its temporary folder, not yet renamed into place."""
    replace = os.replace

    def stopping_replace(src, dst):
        if Path(src).name == f".tmp-checkpoint-{at}":
            stop_here("rename", at)
        return replace(src, dst)

    os.replace = stopping_replace


def stop_in_prune(at: int) -> None:
    """Checkpoint-`at` in place, the one before it half deleted."""
    rmtree = shutil.rmtree

    def stopping_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".deleting-") and (path.parent / f"checkpoint-{at}").is_dir():
            (path / "model.safetensors").unlink()
            stop_here("prune", at)
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = stopping_rmtree


FAULTS = {"step": stop_in_step, "save_state": stop_in_save_state, "rename": stop_before_rename, "prune": stop_in_prune}


def main(argv: list[str]) -> None:
    where, _, at = os.environ[FAULT_ENV].partition(":")
    FAULTS[where](int(at))
    run_main(train_ldm.main, argv)  # as the command line runs it: a preempted run exits 0


if __name__ == "__main__":
    main(sys.argv[1:])
