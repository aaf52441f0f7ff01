"""Crash-safe training checkpoints on top of `accelerator.save_state`, and preemption handling.

A checkpoint is written into a hidden temporary folder and renamed to `checkpoint-{step}` only once complete,
so a run killed mid-save never leaves a folder that `--resume_from_checkpoint latest` could pick. Old
checkpoints are pruned only after the new one exists, so `checkpoints_total_limit` never deletes the only
good one. The manifest of each checkpoint records the size and sha256 of every file in it, so a checkpoint damaged
later (a disk that filled up, a copy that did not finish) is found before it is loaded: `latest` skips it. The hashes
find damage, not tampering (anyone who can change a file can change the manifest): loading trusts no pickle in a
checkpoint, and one that would run code is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from accelerate.utils import load as accelerate_load

from .config import ConfigError
from .manifest import MANIFEST_FILE

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
# Hidden folders a killed save (`.tmp-checkpoint-N`) or deletion (`.deleting-checkpoint-N`) leaves behind.
LEFTOVER_PATTERN = re.compile(r"^\.(tmp|deleting)-checkpoint-\d+$")
# A failed write with less than this left on the device is taken for a full disk (see `_out_of_space`).
FULL_DISK_BYTES = 1 << 20
# Checkpoint files are hashed in chunks of this size: a multi-GB optimizer state never sits in memory whole.
HASH_CHUNK_BYTES = 1 << 20


class DamagedCheckpointError(ConfigError):
    """A checkpoint whose files differ from the sizes and sha256 hashes its manifest recorded when it was saved."""


class CheckpointNotFoundError(ConfigError, FileNotFoundError):
    """`resume_from_checkpoint` names a folder that is not a complete checkpoint (a bad value: one line, exit 2)."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _record_files(folder: Path, pending: dict[str, bytes]) -> None:
    """Merge the size and sha256 of every file in `folder`, and of the `pending` files about to be written there
    (name -> bytes), into the manifest as `"files"`, creating the manifest if there is none."""
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path != manifest_path
    }
    files |= {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in pending.items()}
    manifest["files"] = files
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))


def _find_damage(checkpoint: Path) -> str | None:
    """What is wrong with `checkpoint`'s files, as "<file> <problem>", or None when they match its manifest.

    Every size is checked before any file is hashed, so a truncated or missing file is found without reading the
    others. A checkpoint saved before manifests recorded files (no `"files"` in it) has nothing to check: None.
    """
    manifest_path = checkpoint / MANIFEST_FILE
    try:
        files = json.loads(manifest_path.read_text()).get("files") if manifest_path.is_file() else None
        expected = None if files is None else {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        return f"{manifest_path} cannot be read ({type(error).__name__}: {error})"
    if expected is None:
        # Logged as a warning: `resolve_checkpoint` runs before the training scripts configure logging.
        logger.warning(f"{checkpoint} has no file hashes in its manifest (saved by an older latentddpm): not verified")
        return None
    for name, (size, _) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest recorded {size}"
    for name, (_, sha256) in expected.items():
        if _sha256(checkpoint / name) != sha256:
            return f"{checkpoint / name} has another sha256 than the manifest recorded (same size: bytes changed)"
    return None


def resolve_checkpoint(checkpoint_dir: str | Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from_checkpoint` (`latest`, a path, or None) into a checkpoint folder whose files are intact.

    `latest` is the newest complete checkpoint whose files match its manifest: damaged ones are skipped with a
    warning (checked newest first, stopping at the first intact one, since hashing reads every byte). `latest` with
    no checkpoint yet returns None (a fresh start).

    Raises:
        CheckpointNotFoundError: an explicit path that is not a complete checkpoint.
        DamagedCheckpointError: an explicit path to a damaged checkpoint, or `latest` when every checkpoint is
            damaged (starting from scratch instead would prune them).
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        damaged = []
        for checkpoint in reversed(checkpoints):
            damage = _find_damage(checkpoint)
            if damage is None:
                return checkpoint
            logger.warning(f"Skipping damaged checkpoint {checkpoint}: {damage}")
            damaged.append(damage)
        if damaged:
            raise DamagedCheckpointError(
                f"Every checkpoint in {checkpoint_dir} is damaged: {'; '.join(damaged)}. Restore one from a copy, or "
                "remove them to start from scratch."
            )
        return None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise CheckpointNotFoundError(
            f"resume_from_checkpoint={resume_from!r} is not a complete checkpoint (no {STATE_FILE}). "
            f"Complete checkpoints: {[str(p) for p in list_checkpoints(checkpoint_dir)]}"
        )
    damage = _find_damage(path)
    if damage is not None:
        raise DamagedCheckpointError(
            f"resume_from_checkpoint={resume_from!r} is damaged: {damage}. Resume from another checkpoint "
            "(--resume_from_checkpoint latest picks the newest intact one)."
        )
    return path


def read_training_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _remove_tree(path: Path) -> None:
    # Rename first so a kill during deletion leaves a hidden folder, never a half-deleted checkpoint-N.
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed save ran out of disk space (or quota).

    Only Python's own writes raise `OSError(ENOSPC)`: safetensors raises `SafetensorError("... No space left on
    device (os error 28)")` and `torch.save` a `RuntimeError` that names no cause at all ("unexpected pos ..."). So
    besides the errno and the message of the error and its causes, a write that failed with less than
    `FULL_DISK_BYTES` left on the device counts as a full disk. Call it before removing the partial files.
    """
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(cause) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


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
            manifest) before the folder is renamed into place. The size and sha256 of every file are then merged into
            `manifest.json` as `"files"` (which `resolve_checkpoint` verifies).
        total_limit: keep at most this many checkpoints (the new one included), at least 1.

    Raises:
        RuntimeError: out of disk space; the temporary folder is removed and earlier checkpoints are untouched.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be None or >= 1, got {total_limit}.")
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of a save or a deletion that was killed midway: never a checkpoint, only used space.
        for leftover in checkpoint_dir.iterdir():
            if LEFTOVER_PATTERN.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process has written its random states: all files can be hashed
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            # The state file marks the checkpoint complete, so it is written last; its hash is recorded beforehand.
            state = json.dumps(training_state, indent=2).encode()
            _record_files(tmp, {STATE_FILE: state})
            with open(tmp / STATE_FILE, "wb") as f:
                f.write(state)
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:
        full = _out_of_space(e, checkpoint_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            previous = list_checkpoints(checkpoint_dir)
            raise RuntimeError(
                f"Out of disk space while saving checkpoint-{step} in {checkpoint_dir}. "
                f"The previous checkpoint is intact: {previous[-1] if previous else 'none yet'}. "
                "Free space, then resume with --resume_from_checkpoint latest (or pass that checkpoint's path and "
                "another output_dir)."
            ) from e
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a step saved before, e.g. by a run resumed from an earlier checkpoint
            # Move the old copy aside and delete it only once the new one is in place (it may be the only one).
            old = final.with_name(f".deleting-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(checkpoint_dir)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def _refused_pickles(paths: list[Path]) -> dict[Path, str]:
    """The files among `paths` that `torch.load(weights_only=True)` refuses, with torch's reason."""
    refused = {}
    for path in paths:
        try:
            accelerate_load(path, map_location="cpu")
        except pickle.UnpicklingError as error:
            message = str(error)
            if message.startswith("Weights only load failed"):  # torch's refusal, not e.g. a truncated file
                reasons = [line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line]
                refused[path] = reasons[0] if reasons else "refused by the weights-only unpickler"
    return refused


def load_checkpoint(accelerator, checkpoint: str | Path) -> dict:
    """Restore model, optimizer, LR scheduler and RNG states from `checkpoint` and return its training state.

    Model weights are safetensors; accelerate reads the other states with `torch.load(weights_only=True)`, which
    refuses a pickle that would import or call anything beyond tensors, numbers and containers. accelerate swallows
    that refusal for the RNG states (it logs "Could not load random states" and goes on), so those are checked here
    first; any refusal becomes a `ValueError` naming the file.

    Raises:
        ValueError: a file of the checkpoint holds a pickle with code in it; nothing of it was run.
    """
    checkpoint = Path(checkpoint)
    refused = _refused_pickles(sorted(checkpoint.glob("random_states_*.pkl")))
    if not refused:
        try:
            accelerator.load_state(str(checkpoint))
        except pickle.UnpicklingError:
            refused = _refused_pickles(sorted(checkpoint.glob("*.bin")) + sorted(checkpoint.glob("*.pkl")))
            if not refused:
                raise
    if refused:
        details = "; ".join(f"{path} ({reason})" for path, reason in refused.items())
        raise ValueError(
            f"Refusing to load checkpoint {checkpoint}: {details}. torch.load(weights_only=True) refuses pickles that "
            "import or call anything beyond tensors, numbers and containers, and nothing in them was run. "
            "latentddpm never writes such a pickle, so the checkpoint was modified or is not ours. Do not load it "
            "with weights_only=False: resume from a checkpoint you trust."
        )
    return read_training_state(checkpoint)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Record preemption signals instead of dying, so the loop can checkpoint at the end of the current step.

    Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some time before killing a job; Ctrl-C sends
    SIGINT. Yields the list of signals received so far; the previous handlers are back when the block exits, however
    it exits. Must be entered on the main thread.
    """
    received: list[int] = []

    def record(signum, frame):
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in signals}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
