"""Crash-safe training checkpoints on top of `accelerator.save_state`.

A checkpoint is written into a hidden temporary folder and renamed to `checkpoint-{step}` only once complete,
so a run killed mid-save never leaves a folder that `--resume_from_checkpoint latest` could pick. Old
checkpoints are pruned only after the new one exists, so `checkpoints_total_limit` never deletes the only
good one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(checkpoint_dir: str | Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from_checkpoint` (`latest`, a path, or None) into a checkpoint folder.

    `latest` with no checkpoint yet returns None (a fresh start); an explicit path that is not a complete
    checkpoint raises `FileNotFoundError`.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume_from!r} is not a complete checkpoint (no {STATE_FILE}). "
            f"Complete checkpoints: {[str(p) for p in list_checkpoints(checkpoint_dir)]}"
        )
    return path


def read_training_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _remove_tree(path: Path) -> None:
    # Rename first so a kill during deletion leaves a hidden folder, never a half-deleted checkpoint-N.
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    accelerator,
    checkpoint_dir: str | Path,
    step: int,
    training_state: dict,
    write_extra: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Save `accelerator` state plus our own files as `checkpoint_dir/checkpoint-{step}`, atomically.

    Args:
        accelerator: the run's `Accelerator`; `save_state` writes model, optimizer, LR scheduler and RNG states.
        training_state: JSON-able dict (global step, counters) written last, as `training_state.json`.
        write_extra: called on the main process with the temporary folder, to add files (EMA weights, config,
            manifest) before the folder is renamed into place.
        total_limit: keep at most this many checkpoints (the new one included).

    Raises:
        RuntimeError: out of disk space; the temporary folder is removed and earlier checkpoints are untouched.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            state_path = tmp / STATE_FILE
            with open(state_path, "w") as f:
                json.dump(training_state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = list_checkpoints(checkpoint_dir)
            raise RuntimeError(
                f"Out of disk space while saving checkpoint-{step} in {checkpoint_dir}. "
                f"The previous checkpoint is intact: {previous[-1] if previous else 'none yet'}. "
                "Free space or point output_dir elsewhere, then resume with --resume_from_checkpoint latest."
            ) from e
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # e.g. a preemption save at a step that was already checkpointed
            _remove_tree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(checkpoint_dir)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final
