"""Deterministic batches that are a pure function of the step, so resuming is exact.

No data loader state needs saving: the rows of micro-batch `m` on process `r` are fixed by (seed, m, r), and
so are its random draws (noise, timesteps, caption choice; dropout through `seed_global_rng`). Resuming at step k
replays exactly what an uninterrupted run would have seen from step k on, on any number of restarts.
"""

from __future__ import annotations

import numpy as np
import torch


def _step_seeds(seed: int, micro_step: int, process_index: int) -> tuple[int, int]:
    state = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of an epoch's shuffle."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def step_generator(seed: int, micro_step: int, process_index: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, micro_step, process_index), independent for every combination."""
    return torch.Generator().manual_seed(_step_seeds(seed, micro_step, process_index)[0])


def seed_global_rng(seed: int, micro_step: int, process_index: int = 0) -> None:
    """Seed torch's global generators (CPU and every GPU) from (seed, micro_step, process_index).

    For the draws no generator can be passed to, such as dropout in a text encoder being trained: they become a
    function of the step too, whatever ran before (a checkpoint, a validation). Independent of `step_generator`.
    """
    torch.manual_seed(_step_seeds(seed, micro_step, process_index)[1])


class ShuffledStream:
    """An endless stream of dataset rows: epoch after epoch, each a fresh seeded permutation.

    Micro-batch `m` covers stream positions `[m * global_batch, (m + 1) * global_batch)`; process `r` takes
    its slice of `per_process` rows. Batches may straddle an epoch boundary, so no row is dropped.
    """

    def __init__(self, num_rows: int, per_process: int, num_processes: int = 1, seed: int = 0):
        if num_rows <= 0:
            raise ValueError(f"The dataset is empty (num_rows={num_rows}); nothing to train on.")
        self.num_rows = num_rows
        self.per_process = per_process
        self.global_batch = per_process * num_processes
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = _epoch_generator(self.seed, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=generator)
        return self._perm

    def indices(self, micro_step: int, process_index: int = 0) -> torch.Tensor:
        """Row indices, shape `(per_process,)`, of micro-batch `micro_step` on `process_index`."""
        start = micro_step * self.global_batch + process_index * self.per_process
        positions = torch.arange(start, start + self.per_process)
        epochs = positions // self.num_rows
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            here = epochs == epoch
            out[here] = self._permutation(epoch)[positions[here] % self.num_rows]
        return out


class BucketedStream:
    """An endless stream of single-bucket micro-batches (aspect-ratio buckets, `latentddpm.buckets`), epoch by epoch.

    Every epoch, each bucket's rows are shuffled and cut into global batches of `per_process * num_processes` rows
    (the last one filled up by wrapping around to the start of the bucket's shuffled rows, so every row is seen and
    every batch is full), and the order of all the epoch's batches is shuffled, so buckets come at random, each as
    often as its share of the batches, as in NovelAI's bucketing
    (https://github.com/NovelAI/novelai-aspect-ratio-bucketing). All processes train on the same bucket at each
    micro-step; process `r` takes its slice of `per_process` rows. Only the current epoch is held in memory.

    Args:
        bucket_rows (`list[torch.Tensor]`): The global row indices of each bucket, one 1-D integer tensor per bucket;
            empty buckets are skipped.
        per_process (`int`): Rows per process in a micro-batch.
        num_processes (`int`, defaults to 1): Processes sharing each micro-batch.
        seed (`int`, defaults to 0): Seed of the shuffles.
    """

    def __init__(self, bucket_rows: list[torch.Tensor], per_process: int, num_processes: int = 1, seed: int = 0):
        self.bucket_rows = [torch.as_tensor(rows, dtype=torch.long) for rows in bucket_rows]
        if any(rows.dim() != 1 for rows in self.bucket_rows):
            raise ValueError("Each bucket's rows must be a 1-D tensor of row indices.")
        sizes = [len(rows) for rows in self.bucket_rows]
        if sum(sizes) == 0:
            raise ValueError(f"Every bucket is empty ({len(sizes)} buckets); nothing to train on.")
        self.per_process = per_process
        self.global_batch = per_process * num_processes
        self.seed = seed
        # ceil(size / global_batch) batches per bucket, the same in every epoch.
        self.batches_per_epoch = sum(-(-size // self.global_batch) for size in sizes)
        self._epoch, self._batches, self._buckets = -1, None, None

    @property
    def num_rows(self) -> int:
        """The rows of all buckets."""
        return sum(len(rows) for rows in self.bucket_rows)

    def _epoch_batches(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's batches, `(batches_per_epoch, global_batch)` row indices, and the bucket of each."""
        if epoch != self._epoch:
            generator = _epoch_generator(self.seed, epoch)
            batches, buckets = [], []
            for index, rows in enumerate(self.bucket_rows):
                if len(rows) == 0:
                    continue
                num_batches = -(-len(rows) // self.global_batch)
                shuffled = rows[torch.randperm(len(rows), generator=generator)]
                # Wrap around for the last batch: (num_batches * global_batch,) -> (num_batches, global_batch).
                wrapped = shuffled[torch.arange(num_batches * self.global_batch) % len(rows)]
                batches.append(wrapped.view(num_batches, self.global_batch))
                buckets.append(torch.full((num_batches,), index))
            order = torch.randperm(self.batches_per_epoch, generator=generator)
            self._epoch, self._batches, self._buckets = epoch, torch.cat(batches)[order], torch.cat(buckets)[order]
        return self._batches, self._buckets

    def indices(self, micro_step: int, process_index: int = 0) -> torch.Tensor:
        """Row indices, shape `(per_process,)`, of micro-batch `micro_step` on `process_index`."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        start = process_index * self.per_process
        return self._epoch_batches(epoch)[0][position, start : start + self.per_process].clone()

    def bucket(self, micro_step: int) -> int:
        """The index (in `bucket_rows`) of the bucket that every process's rows of micro-batch `micro_step` are in."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return int(self._epoch_batches(epoch)[1][position])


class PairedStream:
    """Two `ShuffledStream`s in every micro-batch: `first`'s rows, then `second`'s shifted by `offset`.

    For two tables stored one after the other in one cache, such as DreamBooth's instance images and, after them,
    its class images: each batch holds `first.per_process` rows of the first and `second.per_process` of the second,
    each table going through its own epochs, as diffusers' `train_dreambooth.py` pairs them with prior preservation.
    """

    def __init__(self, first: ShuffledStream, second: ShuffledStream, offset: int):
        self.first, self.second, self.offset = first, second, offset

    @property
    def num_rows(self) -> int:
        """The rows of both tables (what a model card counts as the images trained on)."""
        return self.first.num_rows + self.second.num_rows

    def indices(self, micro_step: int, process_index: int = 0) -> torch.Tensor:
        """Row indices, shape `(first.per_process + second.per_process,)`, of micro-batch `micro_step`."""
        second = self.second.indices(micro_step, process_index) + self.offset
        return torch.cat([self.first.indices(micro_step, process_index), second])


class MicroBatches(torch.utils.data.Dataset):
    """Item `m`: micro-batch `m` of one process, drawn from a latent cache: its `rows`, what `LatentCache.draw` returns
    (`latents` before `scale_latents`, `caption_ids`, `loss_mask`, `time_ids`) and `generator_state`, the state of the
    micro-batch's `step_generator` after the draws, from which the training step draws on (noise, timesteps).

    A pure function of `m`, so a `DataLoader` with workers can read ahead (the shards are memory-mapped in each worker)
    while the step runs, and the step sees exactly the draws it would have made itself.
    """

    def __init__(self, cache, stream, seed: int, process_index: int = 0, caption_dropout: float = 0.0):
        self.cache, self.stream, self.seed, self.process_index = cache, stream, seed, process_index
        self.caption_dropout = caption_dropout

    def __getitem__(self, micro_step: int) -> dict:
        rows = self.stream.indices(micro_step, self.process_index)
        generator = step_generator(self.seed, micro_step, self.process_index)
        drawn = self.cache.draw(rows, generator, self.caption_dropout)
        return {"rows": rows, **drawn, "generator_state": generator.get_state()}

    def loader(self, start: int, stop: int, num_workers: int = 0, pin_memory: bool = False):
        """A `DataLoader` of micro-batches `start, ..., stop - 1` in order, `num_workers` reading ahead."""
        return torch.utils.data.DataLoader(
            self,
            batch_size=None,
            sampler=range(start, stop),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            prefetch_factor=2 if num_workers else None,
        )
