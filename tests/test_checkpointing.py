import errno
import os

import pytest
import torch
from accelerate import Accelerator

from latentddpm import checkpointing
from latentddpm.checkpointing import list_checkpoints, read_training_state, resolve_checkpoint, save_checkpoint


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    acc.model, acc.opt = acc.prepare(model, optimizer)
    return acc


def save(accelerator, root, step, **kwargs):
    return save_checkpoint(accelerator, root, step, {"global_step": step}, **kwargs)


def test_latest_is_the_newest_complete_checkpoint(accelerator, tmp_path):
    for step in (5, 10):
        save(accelerator, tmp_path, step)
    (tmp_path / ".tmp-checkpoint-15").mkdir()  # a save killed midway
    (tmp_path / "checkpoint-20").mkdir()  # no training_state.json: incomplete
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert read_training_state(tmp_path / "checkpoint-10")["global_step"] == 10
    assert resolve_checkpoint(tmp_path / "missing", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-20"))


def test_total_limit_prunes_only_after_the_new_one_exists(accelerator, tmp_path):
    for step in (1, 2, 3, 4):
        save(accelerator, tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_failure_while_renaming_leaves_the_previous_checkpoint(accelerator, tmp_path, monkeypatch):
    save(accelerator, tmp_path, 1, total_limit=1)

    def broken_replace(src, dst):
        raise KeyboardInterrupt("killed during the rename")

    monkeypatch.setattr(checkpointing.os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        save(accelerator, tmp_path, 2, total_limit=1)
    monkeypatch.setattr(checkpointing.os, "replace", os.replace)
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    accelerator.load_state(str(tmp_path / "checkpoint-1"))


def test_out_of_disk_space_is_a_clear_error_and_keeps_the_previous_checkpoint(accelerator, tmp_path, monkeypatch):
    save(accelerator, tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(RuntimeError, match="Out of disk space.*checkpoint-1"):
        save(accelerator, tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / ".tmp-checkpoint-2").exists()


def test_resaving_a_step_replaces_it(accelerator, tmp_path):
    save(accelerator, tmp_path, 3)
    with torch.no_grad():
        accelerator.model.weight.add_(1.0)
    save(accelerator, tmp_path, 3)
    expected = accelerator.model.weight.detach().clone()
    with torch.no_grad():
        accelerator.model.weight.zero_()
    accelerator.load_state(str(tmp_path / "checkpoint-3"))
    assert torch.equal(accelerator.model.weight, expected)
