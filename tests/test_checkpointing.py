import errno
import hashlib
import json
import os

import pytest
import torch
from accelerate import Accelerator

from latentddpm import checkpointing
from latentddpm.checkpointing import (
    DamagedCheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_training_state,
    resolve_checkpoint,
    save_checkpoint,
)


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


def test_manifest_records_size_and_sha256_of_every_file_but_itself(accelerator, tmp_path):
    def write_extra(folder):
        (folder / "manifest.json").write_text(json.dumps({"seed": 7}))
        (folder / "extra").mkdir()
        (folder / "extra" / "weights.bin").write_bytes(b"\x00\x01" * 1000)

    checkpoint = save(accelerator, tmp_path, 1, write_extra=write_extra)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["seed"] == 7  # merged into what write_extra wrote
    on_disk = {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    del on_disk["manifest.json"]
    assert {"training_state.json", "extra/weights.bin", "model.safetensors", "optimizer.bin"} <= set(on_disk)
    assert manifest["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in on_disk.items()
    }
    # Without write_extra the manifest is created, holding only the file list.
    assert json.loads((save(accelerator, tmp_path, 2) / "manifest.json").read_text()).keys() == {"files"}


def test_checkpoint_saved_without_file_hashes_still_loads_and_says_so(accelerator, tmp_path, caplog):
    checkpoint = save(accelerator, tmp_path, 1)
    (checkpoint / "manifest.json").unlink()  # as save_checkpoint wrote it before it recorded files
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(tmp_path, "latest") == checkpoint
        assert resolve_checkpoint(tmp_path, str(checkpoint)) == checkpoint
    assert caplog.text.count(f"{checkpoint} has no file hashes in its manifest") == 2
    assert load_checkpoint(accelerator, checkpoint) == {"global_step": 1}


def test_latest_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(accelerator, tmp_path):
    for step in (1, 2):
        (save(accelerator, tmp_path, step) / "optimizer.bin").unlink()
    message = rf"Every checkpoint in {tmp_path} is damaged: .*checkpoint-2/optimizer.bin is missing; .*checkpoint-1"
    with pytest.raises(DamagedCheckpointError, match=message):
        resolve_checkpoint(tmp_path, "latest")
