"""Streamed training data for datasets larger than the disk: decoded and transformed on the fly, resumed exactly.

`StreamingBatches` turns a `datasets` streaming dataset (Hub, parquet, webdataset tar shards, imagefolder) into an
endless sequence of pixel micro-batches that, as in `latentddpm.batching`, is a function of the step: micro-batch `m`
of process `r` holds the same images, crops and captions however often the run was interrupted.

How the rows are laid out. Each epoch the whole dataset is shuffled with `datasets`' own shuffle (the shard order,
then a buffer of `shuffle_buffer` rows), seeded by (seed, epoch), and split by `split_dataset_by_node` into
`num_processes * S` disjoint parts, `S = max(1, num_workers)`: process `r` owns parts `r * S ... r * S + S - 1`, its
substreams. Micro-batch `m` is filled from substream `m % S` with the next `per_process` rows that decode; the
`DataLoader` takes its workers round robin, so worker `w` of a loader started at micro-step `k` reads substream
`(k + w) % S` and makes micro-batches `k + w, k + w + S, ...`. The batches therefore depend on `num_workers`
(resume with the same number) but not on the timing of the workers.

Resuming. A bad image does not fill a slot, so how many rows a micro-batch reads depends on the data. Every batch
says where its substream stands after it (`position`: the epoch and the rows read in it); `StreamingState` keeps the
latest position of every substream as the loop consumes batches, and is what a checkpoint saves. Given those
positions, a resumed `StreamingBatches` skips the rows already read without decoding them: the cost is reading the
current epoch's rows up to there again (parquet and tar bytes through the shuffle buffer, no image decoding; for a
remote dataset, downloading them again). `datasets`' own `state_dict()` would skip whole shards instead, but it does
not save the shuffle buffer, so it cannot resume a shuffled stream exactly. Without positions (a checkpoint that has
none), the stream replays instead: it decodes every image of the earlier micro-batches of its substreams, since the
first epoch, to find where they ended, which is exact but costs about as much as the data loading of the run so far.

Sources and columns: webdataset shards are read as columns named by the file extensions inside them, so a shard of
`000001.png` and `000001.txt` files is read with `image_column="png", caption_column="txt"` (`"jpg"` or `"webp"` for
other formats; `__key__` and `__url__` are the sample's name and shard). Parallelism: give a dataset at least
`num_processes * max(1, num_workers)` shards (files), ideally a multiple of it, so every part reads its own shards;
otherwise each part reads every row and keeps one in `num_processes * max(1, num_workers)`. After reading parquet
shards in parallel, `datasets` pauses 5 s (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, for apache/arrow#45214):
once per epoch and substream, which the prefetched batches cover only partly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Image as ImageFeature
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image

from .batching import step_generator
from .data.images import SkipReason, decode_rgb
from .data.sources import load_image_caption_dataset
from .data.transforms import ImageTransform, pick_caption

# Micro-batch m's crops and caption choices draw from step_generator(seed, m, TRANSFORM_STREAM + process_index): a
# stream independent of the loop's own step_generator(seed, m, process_index), which draws the noise.
TRANSFORM_STREAM = 30_000
# Rows read from `datasets` at a time; the order of the rows does not depend on it.
_READ_CHUNK = 64

Position = tuple[int, int]  # (epoch, rows of that epoch read so far) of one substream


def load_streaming_dataset(
    source: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    **generator_kwargs,
) -> IterableDataset:
    """Opens an image-caption dataset for streaming: nothing is downloaded or decoded before it is iterated.

    The sources are those of `load_image_caption_dataset` (a `.parquet` or `.tar` path or glob, a local folder, a Hub
    name; the generated datasets too, as an iterable view of the generated rows), with the same one-line errors for
    a missing column. The image column is cast
    to `datasets.Image(decode=False)`, so reading a row never decodes an image (and never raises on a bad one):
    `StreamingBatches` decodes with `decode_rgb` and skips what it rejects.

    Args:
        source (`str`): Where the data is; see `load_image_caption_dataset`.
        split (`str`, defaults to `"train"`): Split to stream.
        image_column (`str`, defaults to `"image"`): Column holding the images (`"png"`, `"jpg"`... for webdataset).
        caption_column (`str`, defaults to `"text"`): Column holding the captions (`"txt"` for webdataset).
        max_train_samples (`int`, *optional*): Stream only the first this many rows.
        data_files (`str` or `list` or `dict`, *optional*): Files to pick inside a Hub or folder source.
        dataset_config_name (`str`, *optional*): Configuration of a Hub dataset that has several.
        cache_dir (`str`, *optional*): Where `datasets` caches what it downloads.
        generator_kwargs: Arguments of the generator, only with a generated source (`"shapes"`, `"polygons"`).

    Returns:
        `datasets.IterableDataset` with at least `image_column` and `caption_column`.
    """
    dataset = load_image_caption_dataset(
        source,
        split=split,
        image_column=image_column,
        caption_column=caption_column,
        max_train_samples=max_train_samples,
        data_files=data_files,
        cache_dir=cache_dir,
        dataset_config_name=dataset_config_name,
        streaming=True,
        **generator_kwargs,
    )
    return _undecoded(dataset, image_column)


@dataclass
class StreamingState:
    """Where the substreams of a `StreamingBatches` stand after the micro-batches a run has consumed.

    Update it with every batch the training loop takes from the loader (not with those the workers prefetched), save
    it with the checkpoint (`dataclasses.asdict`), and resume with
    `StreamingBatches(..., start_micro_step=state.micro_step, positions=state.positions)` and the same `num_workers`.

    Args:
        num_workers (`int`): The loader's workers; there is one substream per worker (one without workers).
        micro_step (`int`, defaults to 0): The next micro-step to consume.
        positions (`list` of `(epoch, rows read)`, *optional*): Per substream, where it stands; the start of the first
            epoch for a new run.
    """

    num_workers: int
    micro_step: int = 0
    positions: list[Position] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: {"corrupt": 0, "too small": 0})  # images, by reason

    def __post_init__(self):
        if not self.positions:
            self.positions = [(0, 0)] * max(1, self.num_workers)
        self.positions = [tuple(position) for position in self.positions]  # lists after a JSON round trip

    def update(self, batch: dict[str, Any]) -> None:
        """Records that `batch`, from a `StreamingBatches`, was consumed."""
        if batch["micro_step"] != self.micro_step:
            raise ValueError(f"Expected micro-batch {self.micro_step}, got {batch['micro_step']}: out of order.")
        self.positions[self.micro_step % len(self.positions)] = tuple(batch["position"])
        self.skipped = {reason: count + batch["skipped"][reason] for reason, count in self.skipped.items()}
        self.micro_step += 1

    def register_for_checkpointing(self, accelerator) -> None:
        """Save and load this process's state with every `accelerator.save_state` / `load_state`, as
        `stream_state_{process_index}.json` (each process streams its own rows; accelerate calls the hooks on each)."""

        def path(folder: str) -> Path:
            return Path(folder) / f"stream_state_{accelerator.process_index}.json"

        def save_hook(models, weights, folder: str) -> None:
            path(folder).parent.mkdir(parents=True, exist_ok=True)
            path(folder).write_text(json.dumps(dataclasses.asdict(self)))

        def load_hook(models, folder: str) -> None:
            if not path(folder).is_file():
                raise FileNotFoundError(f"{path(folder)} is missing: the checkpoint is not of a streaming run.")
            saved = StreamingState(**json.loads(path(folder).read_text()))
            self.num_workers, self.micro_step, self.positions = saved.num_workers, saved.micro_step, saved.positions
            self.skipped = saved.skipped

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


class StreamingBatches(torch.utils.data.IterableDataset):
    """Endless micro-batches of decoded, transformed images and their captions, streamed from a `datasets`
    `IterableDataset`, that are a function of the micro-step (see the module docstring for the layout and resuming).

    Iterating yields, in order `m = start_micro_step, start_micro_step + 1, ...`, dicts with
    - `"micro_step"`: `m`;
    - `"pixels"`: `torch.Tensor` of shape `(per_process, 3, resolution, resolution)`, float32 in [-1, 1];
    - `"captions"`: `list[str]`, one per image, drawn with `pick_caption` when a row holds several;
    - `"skipped"`: `{"corrupt": n, "too small": n}`, the rows rejected while filling this batch;
    - `"position"`: `(epoch, rows read)` of substream `m % max(1, num_workers)` after this batch, for
      `StreamingState`.
    Crops, flips and caption choices draw from `step_generator(seed, m, TRANSFORM_STREAM + process_index)`.

    Args:
        dataset (`datasets.IterableDataset`): The stream, such as `load_streaming_dataset` returns (any other one
            has its image column cast to `datasets.Image(decode=False)` here).
        transform (`ImageTransform`): Resize, crop and flip of each image.
        per_process (`int`): Images per micro-batch on this process.
        process_index (`int`, defaults to 0): This process, in `[0, num_processes)`.
        num_processes (`int`, defaults to 1): Processes reading disjoint parts of the stream.
        seed (`int`, defaults to 0): Seed of the shuffling and of the random draws.
        start_micro_step (`int`, defaults to 0): The first micro-step to yield.
        positions (`list` of `(epoch, rows read)`, *optional*): `StreamingState.positions` at `start_micro_step`:
            resume by skipping rows undecoded. Without it, a start after 0 replays by decoding (see the module
            docstring).
        image_column (`str`, defaults to `"image"`): Column holding the images.
        caption_column (`str`, defaults to `"text"`): Column holding a caption or a list of captions.
        min_image_size (`int`, defaults to 8): Images with a shorter side below this are skipped as `"too small"`.
        shuffle_buffer (`int`, defaults to 1000): Rows in `datasets`' shuffle buffer; more shuffles better and
            costs memory in every part.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        transform: ImageTransform,
        per_process: int,
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        start_micro_step: int = 0,
        positions: Sequence[Position] | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        min_image_size: int = 8,
        shuffle_buffer: int = 1000,
    ):
        if per_process < 1 or shuffle_buffer < 1 or start_micro_step < 0:
            raise ValueError(
                f"per_process and shuffle_buffer must be positive and start_micro_step non-negative, got "
                f"per_process={per_process}, shuffle_buffer={shuffle_buffer}, start_micro_step={start_micro_step}."
            )
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
        # Only the two columns go through the shuffle buffer and to the workers.
        self.dataset = _undecoded(dataset, image_column).select_columns([image_column, caption_column])
        self.transform = transform
        self.per_process = per_process
        self.process_index = process_index
        self.num_processes = num_processes
        self.seed = seed
        self.start_micro_step = start_micro_step
        self.positions = None if positions is None else [tuple(position) for position in positions]
        self.image_column = image_column
        self.caption_column = caption_column
        self.min_image_size = min_image_size
        self.shuffle_buffer = shuffle_buffer

    def check_num_workers(self, num_workers: int) -> None:
        """Raises if `positions` were saved by a run with another number of loader workers."""
        if self.positions is not None and len(self.positions) != max(1, num_workers):
            raise ValueError(
                f"The stream positions are of a run with {len(self.positions)} substreams (num_workers "
                f"{len(self.positions)} or 0 for 1), but num_workers={num_workers}; resume with the same num_workers."
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        self.check_num_workers(num_workers)
        # The loader takes its workers round robin from worker 0: this worker makes every num_workers-th micro-batch
        # from `first` on, all of one substream.
        first = self.start_micro_step + worker
        substream = first % num_workers
        epoch, read = (0, 0) if self.positions is None else self.positions[substream]
        rows = self._rows(substream, num_workers, epoch, read)
        if self.positions is None:
            # Replay: the substream's earlier micro-batches, decoded only to find which rows they read.
            for _ in range(substream, first, num_workers):
                self._fill(rows)
        for micro_step in itertools.count(first, num_workers):
            images, captions, skipped, position = self._fill(rows)
            generator = step_generator(self.seed, micro_step, TRANSFORM_STREAM + self.process_index)
            yield {
                "micro_step": micro_step,
                "pixels": torch.stack([self.transform(image, generator) for image in images]),
                "captions": [pick_caption(caption, generator) for caption in captions],
                "skipped": skipped,
                "position": position,
            }

    def _part(self, substream: int, num_substreams: int, epoch: int) -> IterableDataset:
        """The rows of one substream of this process in `epoch`: the same shuffle on every process and worker (so
        the parts are disjoint), a new one each epoch."""
        shuffled = self.dataset.shuffle(
            generator=np.random.default_rng([self.seed, epoch]), buffer_size=self.shuffle_buffer
        )
        parts = self.num_processes * num_substreams
        return split_dataset_by_node(shuffled, rank=self.process_index * num_substreams + substream, world_size=parts)

    def _rows(self, substream: int, num_substreams: int, epoch: int, read: int) -> Iterator[tuple[Position, dict]]:
        """Endless `((epoch, rows read), row)` of one substream, epoch after epoch, from `read` rows into `epoch`."""
        skip = read
        while True:
            read = 0
            # `iter` rather than `__iter__`, which would split the part again among the loader's workers.
            for chunk in self._part(substream, num_substreams, epoch).iter(batch_size=_READ_CHUNK):
                for image, caption in zip(chunk[self.image_column], chunk[self.caption_column]):
                    read += 1
                    if read > skip:
                        yield (epoch, read), {"image": image, "caption": caption}
            if read == 0:
                raise ValueError(
                    f"Part {substream} of process {self.process_index}'s stream is empty: the dataset has fewer rows "
                    f"than num_processes * max(1, num_workers) = {self.num_processes * num_substreams}."
                )
            epoch, skip = epoch + 1, 0

    def _fill(
        self, rows: Iterator[tuple[Position, dict]]
    ) -> tuple[list[Image.Image], list[Any], dict[SkipReason, int], Position]:
        """The next `per_process` rows whose image decodes, the rejected ones counted, and the position after."""
        images, captions = [], []
        skipped: dict[SkipReason, int] = {"corrupt": 0, "too small": 0}
        rejecting_since = None  # the epoch of the first rejection since the last good image
        while len(images) < self.per_process:
            position, row = next(rows)
            rgb, reason = decode_rgb(row["image"], min_size=self.min_image_size)
            if reason is None:
                images.append(rgb)
                captions.append(row["caption"])
                rejecting_since = None
                continue
            skipped[reason] += 1
            rejecting_since = position[0] if rejecting_since is None else rejecting_since
            if position[0] > rejecting_since + 1:  # a whole epoch of this substream without a usable image
                raise ValueError(
                    f"No usable image in column {self.image_column!r} in a whole epoch of process "
                    f"{self.process_index}'s part of the stream; min_image_size={self.min_image_size}."
                )
        return images, captions, skipped, position


def streaming_loader(
    batches: StreamingBatches, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """The `DataLoader` that decodes `batches` in `num_workers` processes (in this one for 0) ahead of the loop.

    Iterate it once: it is endless, and a second iterator restarts at `batches.start_micro_step`. Its workers persist
    and each prefetches two micro-batches; the output keeps the micro-step order whatever worker finishes first.

    Args:
        batches (`StreamingBatches`): What to load; already micro-batches (`batch_size=None`).
        num_workers (`int`, defaults to 0): Worker processes, each decoding its own substream.
        pin_memory (`bool`, defaults to `False`): Page-lock the pixels for asynchronous copies to the GPU (on CUDA).
    """
    batches.check_num_workers(num_workers)
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        in_order=True,
    )


def _undecoded(dataset: IterableDataset, image_column: str) -> IterableDataset:
    """`dataset` whose `datasets.Image` column yields encoded bytes or paths rather than decoded images."""
    if dataset.features is not None and isinstance(dataset.features.get(image_column), ImageFeature):
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset
