"""Checkpoints committed to the Hub while training (`hub_strategy`) and resuming from a repo's `last-checkpoint/`.

The Hub cannot run here, so its side of `HfApi.create_repo` and `HfApi.upload_folder` is recorded by `RecordedHub`:
each commit becomes a snapshot of the repo in the Hub cache's layout, the folders `snapshot_download` returns. Every
other part is the real one, `snapshot_download` (offline, reading that cache) included."""

import filecmp
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from safetensors.torch import load_file
from test_training import ldm_args, unet_weights

from latentddpm import LatentDDPMPipeline, hub, losses
from latentddpm.checkpointing import CheckpointNotFoundError, read_training_state, resolve_checkpoint
from latentddpm.config import ConfigError
from latentddpm.hub import LAST_CHECKPOINT, STAGING, UPLOAD_ATTEMPTS, HubUploader
from latentddpm.models import ConditionalUNet
from latentddpm.runs import Preempted
from latentddpm.training import train_ldm

REPO_ID = "user/tiny-ldm"
HUB_ARGS = ("--push_to_hub", "true", "--hub_model_id", REPO_ID)


class RecordedHub:
    """Commits recorded as the Hub would hold them: commit N is the folder `snapshots/<N as 40 hex digits>` of the
    repo in the Hub cache (`cache/models--user--tiny-ldm`), the previous snapshot with the uploaded files over it,
    and `refs/main` names the newest. The first `failures` upload calls raise a `ConnectionError` instead.

    Args:
        cache (`Path`): the Hub cache folder.
        failures (`int`): how many upload calls fail before the uploads land.
        gate (`threading.Event`, *optional*): each upload call first waits for it.
    """

    def __init__(self, cache: Path, failures: int = 0, gate: threading.Event | None = None):
        self.cache = cache
        self.failures = failures
        self.gate = gate
        self.calls = 0
        self.commits: list[tuple[str, Path, set[str]]] = []  # (message, snapshot, files of the commit)

    def storage(self, repo_id: str) -> Path:
        return self.cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo_id, repo_type="model")

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message, ignore_patterns=None, **kwargs):
        if self.gate is not None:
            self.gate.wait()
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"recorded failure {self.calls} of {self.failures}")
        folder = Path(folder_path)
        files = [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file()]
        files = set(filter_repo_objects(files, ignore_patterns=(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        oid = f"{len(self.commits) + 1:040x}"
        snapshot = self.storage(repo_id) / "snapshots" / oid
        if self.commits:
            shutil.copytree(self.commits[-1][1], snapshot)
        for name in files:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, snapshot / name)
        (self.storage(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        (self.storage(repo_id) / "refs" / "main").write_text(oid)
        self.commits.append((commit_message, snapshot, files))
        url = f"https://huggingface.co/{repo_id}/commit/{oid}"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid=oid)

    @property
    def messages(self) -> list[str]:
        return [message for message, _, _ in self.commits]


@pytest.fixture
def recorded_hub(tmp_path, monkeypatch):
    """Substitutes the recorder for the Hub, points the Hub cache at it, and makes retries immediate."""

    def install(failures: int = 0, gate: threading.Event | None = None) -> RecordedHub:
        recorder = RecordedHub(tmp_path / "hub-cache", failures, gate)
        # Bound methods set on the class are not bound again: `api.upload_folder(...)` calls the recorder's.
        monkeypatch.setattr(HfApi, "create_repo", recorder.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", recorder.upload_folder)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(recorder.cache))
        monkeypatch.setattr(hub, "RETRY_DELAY_SECONDS", 0.01)
        return recorder

    return install


def test_every_save_commits_each_checkpoints_pipeline_in_order_then_the_final_one(tiny_vae, tmp_path, recorded_hub):
    recorder = recorded_hub()
    args = ("--hub_strategy", "every_save", "--max_train_steps", "4", "--checkpointing_steps", "2")
    out = train_ldm.main(ldm_args(tiny_vae, tmp_path, *HUB_ARGS, *args))

    # Every commit has landed when main returns: the end waits for the background ones.
    assert recorder.messages == ["Training in progress, step 2", "Training in progress, step 4", "End of training"]
    pipeline_files = {
        path.relative_to(out).as_posix()
        for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        for path in (out / folder).rglob("*")
        if path.is_file()
    } | {"model_index.json", "README.md"}
    for step, (_, snapshot, files) in zip((2, 4), recorder.commits):
        assert files == pipeline_files  # complete, and no training state with every_save
        # The committed U-Net is the EMA one the checkpoint of that step holds (what the final pipeline keeps).
        committed = ConditionalUNet.from_pretrained(str(snapshot / "unet"))
        shards = load_file(str(out / "checkpoints" / f"checkpoint-{step}" / "ema_shard_0.safetensors"))  # one process
        assert len(shards) == len(list(committed.parameters()))
        assert all(torch.equal(p, shards[str(i)]) for i, p in enumerate(committed.parameters()))
        steps = "2 of 4" if step == 2 else "4"
        assert f"| Steps | {steps} |" in ModelCard.load(snapshot / "README.md").text  # the card of that step
    LatentDDPMPipeline.from_pretrained(str(recorder.commits[0][1]))  # each commit is a loadable pipeline

    _, final, files = recorder.commits[-1]
    assert {"README.md", "sample_grid.png", "train_config.yaml", "manifest.json"} <= files
    assert not any(name.startswith(("checkpoints/", "validation/", ".hub-staging/")) for name in files)
    assert filecmp.cmp(final / "README.md", out / "README.md", shallow=False)
    assert all(torch.equal(unet_weights(final)[k], v) for k, v in unet_weights(out).items())
    assert not any((out / STAGING).iterdir())  # each staged folder goes once committed


@pytest.mark.parametrize("failures", [2, UPLOAD_ATTEMPTS])
def test_failed_uploads_are_retried_logged_and_never_stop_training(tiny_vae, tmp_path, recorded_hub, caplog, failures):
    recorder = recorded_hub(failures=failures)
    args = ("--hub_strategy", "every_save", "--max_train_steps", "4", "--checkpointing_steps", "2")
    with caplog.at_level(logging.WARNING, logger="latentddpm.hub"):
        out = train_ldm.main(ldm_args(tiny_vae, tmp_path, *HUB_ARGS, *args))

    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(" failed ")[1].split(",")[0] for m in retries] == [
        f"(attempt {i} of {UPLOAD_ATTEMPTS}" for i in range(1, min(failures, UPLOAD_ATTEMPTS - 1) + 1)
    ]
    if failures < UPLOAD_ATTEMPTS:  # step 2 landed on its third attempt
        expected = ["Training in progress, step 2", "Training in progress, step 4", "End of training"]
    else:  # step 2 was given up, with an error in the log; the next ones landed
        expected = ["Training in progress, step 4", "End of training"]
        [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert error.startswith(f"Gave up committing step 2 to {REPO_ID} after {UPLOAD_ATTEMPTS} attempts")
    assert recorder.messages == expected
    assert read_training_state(out / "checkpoints" / "checkpoint-4")["global_step"] == 4  # training went on


@pytest.mark.slow
def test_last_checkpoint_from_the_repo_resumes_bitwise_on_another_machine(
    tiny_vae, tmp_path, recorded_hub, monkeypatch, caplog
):
    recorder = recorded_hub()

    def args(machine: str, *extra: str) -> list[str]:  # one latent cache for the three runs
        return ldm_args(tiny_vae, tmp_path / machine, *extra, "--cache_dir", str(tmp_path / "cache"))

    straight = train_ldm.main(args("straight"))

    # Machine 1 commits checkpoint-3 and is preempted during step 5: the checkpoint it saves then is committed as
    # last-checkpoint/ before the run stops.
    diffusion_loss, calls = losses.diffusion_loss, []

    def preempted_loss(*args, **kwargs):
        calls.append(None)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(losses, "diffusion_loss", preempted_loss)
    with pytest.raises(Preempted, match="stopped at step 5"):
        train_ldm.main(args("machine-1", *HUB_ARGS, "--hub_strategy", "checkpoint", "--checkpointing_steps", "3"))
    monkeypatch.setattr(losses, "diffusion_loss", diffusion_loss)
    assert recorder.messages == ["Training in progress, step 3", "Training in progress, step 5"]
    last = recorder.commits[-1][1] / LAST_CHECKPOINT
    local = tmp_path / "machine-1" / "run" / "checkpoints" / "checkpoint-5"
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file())
    assert all(filecmp.cmp(local / name, last / name, shallow=False) for name in names)
    assert resolve_checkpoint(tmp_path, str(last)) == last  # its manifest's sizes and hashes hold

    # Machine 2 has only the repo id: snapshot_download finds last-checkpoint/ (here, in the Hub cache).
    with caplog.at_level(logging.INFO, logger="latentddpm.runs"):
        resumed = train_ldm.main(args("machine-2", "--resume_from_checkpoint", REPO_ID))
    # It resumed (a fresh start would end with the same weights too): from the snapshot of the newest commit.
    assert any(message.endswith(f"Resumed from {last} at step 5") for message in caplog.messages)
    expected, got = unet_weights(straight), unet_weights(resumed)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_checkpoint_is_pushed_without_waiting_for_the_upload_and_commits_keep_their_order(tmp_path, recorded_hub):
    gate = threading.Event()
    recorder = recorded_hub(gate=gate)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text("{}")

    def write_folder(folder: Path) -> None:
        (folder / "weights.txt").write_text(folder.name)

    uploader = HubUploader(REPO_ID, "checkpoint", write_folder, tmp_path / "staging")
    for step in (1, 2, 3):
        uploader.push_checkpoint(checkpoint, step)  # returns with the upload blocked at the Hub
    assert recorder.commits == []
    gate.set()
    uploader.wait()
    assert recorder.messages == [f"Training in progress, step {step}" for step in (1, 2, 3)]
    assert [(snapshot / "weights.txt").read_text() for _, snapshot, _ in recorder.commits] == [
        "step-1",
        "step-2",
        "step-3",
    ]
    assert all(files == {"weights.txt", f"{LAST_CHECKPOINT}/training_state.json"} for _, _, files in recorder.commits)
    assert not any((tmp_path / "staging").iterdir())  # each folder goes once committed

    HubUploader(REPO_ID, "end", write_folder, tmp_path / "staging").push_checkpoint(checkpoint, 4)
    assert len(recorder.commits) == 3  # "end" commits nothing before the final push


def test_resuming_from_a_repo_without_last_checkpoint_is_a_one_line_error(tiny_vae, tmp_path, recorded_hub):
    recorded_hub()
    with pytest.raises(CheckpointNotFoundError, match="'user/missing' is no local folder, and the Hub model repo"):
        train_ldm.main(ldm_args(tiny_vae, tmp_path, "--resume_from_checkpoint", "user/missing"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--hub_strategy", "checkpoint"), "needs push_to_hub"),
        ((*HUB_ARGS, "--hub_strategy", "every_save", "--checkpointing_steps", "0"), "checkpointing_steps > 0"),
        (("--hub_strategy", "always"), "'hub_strategy' must be one of"),
    ],
)
def test_bad_hub_strategy_fails_before_training(tiny_vae, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train_ldm.main(ldm_args(tiny_vae, tmp_path, *extra))
