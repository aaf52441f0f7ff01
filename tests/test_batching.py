import pytest
import torch

from latentddpm.batching import ShuffledStream, step_generator


def test_each_epoch_visits_every_row_once():
    stream = ShuffledStream(num_rows=10, per_process=3, num_processes=1, seed=0)
    rows = torch.cat([stream.indices(m) for m in range(10)])  # 30 positions = 3 epochs
    for epoch in range(3):
        assert sorted(rows[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:20])  # reshuffled each epoch


def test_processes_split_the_global_batch_without_overlap():
    single = ShuffledStream(num_rows=100, per_process=8, num_processes=1, seed=3)
    double = ShuffledStream(num_rows=100, per_process=4, num_processes=2, seed=3)
    for m in range(5):
        both = torch.cat([double.indices(m, 0), double.indices(m, 1)])
        assert torch.equal(both, single.indices(m))


def test_batches_are_a_function_of_the_step_only():
    a = ShuffledStream(num_rows=37, per_process=5, seed=1)
    b = ShuffledStream(num_rows=37, per_process=5, seed=1)
    late = [b.indices(m) for m in (20, 3, 11)]  # any order, as after a resume
    assert all(torch.equal(x, a.indices(m)) for x, m in zip(late, (20, 3, 11)))


def test_step_generators_are_reproducible_and_distinct():
    x = torch.randn(4, generator=step_generator(0, 5, 0))
    assert torch.equal(x, torch.randn(4, generator=step_generator(0, 5, 0)))
    assert not torch.equal(x, torch.randn(4, generator=step_generator(0, 6, 0)))
    assert not torch.equal(x, torch.randn(4, generator=step_generator(0, 5, 1)))


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset is empty"):
        ShuffledStream(num_rows=0, per_process=4)
