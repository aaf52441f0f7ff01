"""A training run and the Hugging Face Hub: commits of its checkpoints while it trains (`hub_strategy`, as in
transformers' `Trainer`), the hardware line of its model card, and resuming from a model repo's `last-checkpoint/`."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object
from huggingface_hub import HfApi, snapshot_download

from .checkpointing import CheckpointNotFoundError
from .pipelines.model_card import hub_repo_id

logger = logging.getLogger(__name__)

HubStrategy = Literal["end", "every_save", "checkpoint"]
LAST_CHECKPOINT = "last-checkpoint"  # the repo folder that holds the newest full training state (Trainer's name)
STAGING = ".hub-staging"  # in output_dir: the folders being committed, one per checkpoint step
UPLOAD_ATTEMPTS = 4  # tries of one commit before it is given up
RETRY_DELAY_SECONDS = 2.0  # wait before the first retry, doubled before each next one
# What the final commit leaves out of output_dir: training states and the images and reports of every step (the
# card shows the final grid and metrics). The pipeline, the card, config, manifest and TensorBoard logs go up.
FINAL_IGNORE_PATTERNS = ["checkpoints/", "validation/", "evaluation/", f"{STAGING}/"]


def hardware_description(accelerator) -> str:
    """The devices of all processes, counted: `"8 x NVIDIA H100 80GB HBM3"`. Call it on every process (it gathers)."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"CPU ({platform.processor() or platform.machine()})"
    else:
        name = device.type
    counts = Counter(gather_object([name]))
    return ", ".join(f"{count} x {name}" for name, count in counts.items())


def _link_or_copy(source: str, destination: str) -> None:
    # A hard link costs no space or time, and keeps the bytes if the checkpoint is pruned before the upload ends.
    try:
        os.link(source, destination)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, destination)


class HubUploader:
    """Commits a training run's saves to a Hub model repository from one background thread, in the order made.

    With `hub_strategy="every_save"` each checkpoint's pipeline is committed ("Training in progress, step N"); with
    `"checkpoint"` the commit also holds the checkpoint itself as `last-checkpoint/`, so that the pipeline and the
    state it came from always match and `--resume_from_checkpoint <repo_id>` can continue the run elsewhere; `"end"`
    commits nothing until `push_final`. The training step only writes the folder to commit (`write_folder`: the
    pipeline and its card) and hard links to the checkpoint's files; the upload runs in the background. A failed
    upload is retried (`UPLOAD_ATTEMPTS` tries, the wait doubling from `RETRY_DELAY_SECONDS`), then given up with an
    error in the log: training never stops for the Hub.

    Args:
        repo_id (`str`): the model repository, created (`exist_ok`) before the first commit.
        hub_strategy (`str`): `"end"`, `"every_save"` or `"checkpoint"`.
        write_folder (`Callable[[Path], None]`): writes what a checkpoint commits at the repo's root into a folder.
        staging_dir (`Path`): where the folders being committed are written (removed once committed).
        private (`bool`, *optional*): whether a newly created repository is private.
    """

    def __init__(
        self,
        repo_id: str,
        hub_strategy: HubStrategy,
        write_folder: Callable[[Path], None],
        staging_dir: Path,
        private: bool | None = None,
    ):
        self.repo_id = repo_id
        self.hub_strategy = hub_strategy
        self.write_folder = write_folder
        self.staging_dir = Path(staging_dir)
        self.private = private
        self.api = HfApi()  # the cached login or $HF_TOKEN: a token in the config would be saved with it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")  # one: in order
        self._pending: list[Future] = []
        self._repo_created = False

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Queue the commit of `checkpoint` (saved at `step`) as the strategy says; returns once its folder is
        written, before the upload."""
        if self.hub_strategy == "end":
            return
        folder = self.staging_dir / f"step-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.write_folder(folder)
        if self.hub_strategy == "checkpoint":
            shutil.copytree(checkpoint, folder / LAST_CHECKPOINT, copy_function=_link_or_copy)
        self._pending.append(self._executor.submit(self._commit_checkpoint, folder, step))

    def wait(self) -> None:
        """Block until every queued commit has landed or been given up."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def push_final(self, folder: Path) -> str:
        """After the queued commits, commit the run's output folder (the final pipeline and its card, without
        `FINAL_IGNORE_PATTERNS`) and return the commit's URL.

        Raises:
            OSError: the upload failed `UPLOAD_ATTEMPTS` times; everything is still in `folder`.
        """
        self.wait()
        self._executor.shutdown()  # nothing is queued after the final commit
        return self._upload(folder, "End of training", ignore_patterns=FINAL_IGNORE_PATTERNS).commit_url

    def _commit_checkpoint(self, folder: Path, step: int) -> None:
        try:
            self._upload(folder, f"Training in progress, step {step}")
        except Exception as error:  # never fatal: the checkpoint is safe on disk, and the next one will be pushed
            logger.error(
                f"Gave up committing step {step} to {self.repo_id} after {UPLOAD_ATTEMPTS} attempts "
                f"({type(error).__name__}: {error}); training goes on."
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _upload(self, folder: Path, message: str, ignore_patterns: list[str] | None = None):
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                if not self._repo_created:
                    self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                    self._repo_created = True
                commit = self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=folder, commit_message=message, ignore_patterns=ignore_patterns
                )
                logger.info(f"Committed {message!r} to {self.repo_id}")
                return commit
            except Exception as error:  # the Hub's HTTP errors, connection errors, timeouts: all worth a retry
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                delay = RETRY_DELAY_SECONDS * 2 ** (attempt - 1)
                logger.warning(
                    f"Commit {message!r} to {self.repo_id} failed (attempt {attempt} of {UPLOAD_ATTEMPTS}, "
                    f"{type(error).__name__}: {error}); retrying in {delay:g} s"
                )
                time.sleep(delay)


def download_last_checkpoint(repo_id: str) -> Path:
    """The `last-checkpoint/` folder of the Hub model repo `repo_id` (committed by `hub_strategy: checkpoint`),
    downloaded into the Hub cache (or found there, offline).

    Raises:
        CheckpointNotFoundError: the repo cannot be reached or has no `last-checkpoint/`.
    """
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[f"{LAST_CHECKPOINT}/*"]))
    except OSError as error:  # every huggingface_hub error: not found, offline, unauthorized
        raise CheckpointNotFoundError(
            f"resume_from_checkpoint={repo_id!r} is no local folder, and the Hub model repo of that name could not "
            f"be read ({type(error).__name__}: {error})."
        ) from error
    if not (snapshot / LAST_CHECKPOINT).is_dir():
        raise CheckpointNotFoundError(
            f"resume_from_checkpoint={repo_id!r}: the Hub model repo has no {LAST_CHECKPOINT}/ (it is pushed by "
            "hub_strategy: checkpoint)."
        )
    return snapshot / LAST_CHECKPOINT


def hub_checkpoint(resume_from: str | None) -> str | None:
    """`resume_from` with a Hub repo id (one that is not a local folder) replaced by its downloaded
    `last-checkpoint/`; anything else (`latest`, a path, None) as it is."""
    if resume_from is None or resume_from == "latest" or hub_repo_id(resume_from) is None:
        return resume_from
    return str(download_last_checkpoint(resume_from))
