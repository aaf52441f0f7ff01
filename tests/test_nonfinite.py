import pytest
import torch

from latentddpm.nonfinite import NonFiniteGuard


def test_skips_and_counts_non_finite_steps_and_resets_on_a_finite_one(tmp_path):
    guard = NonFiniteGuard(max_consecutive=3, checkpoint_dir=tmp_path, skipped=4)
    assert guard.should_step(torch.tensor(1.0), step=0)
    assert not guard.should_step(torch.tensor(float("nan")), step=1)
    assert not guard.should_step(torch.tensor(float("inf")), step=2)
    assert guard.should_step(torch.tensor(2.0), step=3)
    assert (guard.skipped, guard.consecutive) == (6, 0)


def test_stops_after_max_consecutive_and_names_the_last_good_checkpoint(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "training_state.json").write_text("{}")
    guard = NonFiniteGuard(max_consecutive=2, checkpoint_dir=tmp_path)
    assert not guard.should_step(torch.tensor(float("nan")), step=8)
    with pytest.raises(RuntimeError, match=r"Stopping at step 9: 2 steps in a row.*checkpoint-7"):
        guard.should_step(torch.tensor(float("nan")), step=9)
