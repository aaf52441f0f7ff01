"""Precomputed latents and text embeddings in memory-mapped shards, so training never runs the VAE or the text encoder
and a process's memory does not grow with the dataset.

The cache lives in `cache_dir/<key>/`, where the key hashes everything the cached tensors depend on: the dataset
fingerprint, the VAE and text encoder weights and configs, the tokenizer length, the image transform and how the
tensors are stored. A second run with the same inputs opens it instead of encoding again; any change makes a new key.

Every process of an `accelerate launch` builds its share of the shards (shard `s` by process `s mod P`), each shard a
safetensors file written atomically, so a killed build resumes at the shards it is missing and ends identical to an
uninterrupted one (a shard's random crops are drawn from a generator seeded by the shard). `index.json`, written last
by the main process, marks the cache complete.

Latent shards `latents-00000.safetensors` hold source rows `[s * shard_size, (s + 1) * shard_size)`, less the images
that cannot be decoded (skipped and counted, as `prepare_image_dataset` does), in groups of one latent size (one
group without aspect-ratio buckets; with them, one per bucket, in bucket order). Per group `g`:
- `latent_mean.g`, `latent_std.g` `(n, F, C, h, w)`: the VAE posterior before scaling, for `F` views of each image
  (1, or 2 when random flips are on: the image and its mirror), in `dtype` (float16 by default). Training samples
  `mean + std * eps` each step, as LDM does. `std` is zero for AutoencoderTiny.
- `caption_ids.g` `(n, K)`: indices into the caption rows for each image's K captions, -1 where an image has fewer.
- `loss_mask.g` `(n, F, 1, h, w)`, only when built with `loss_mask=True`: each view's alpha channel (ones for an
  opaque image) averaged down to the latent grid, the weights of `masked_loss` training.
- `time_ids.g` `(n, F, 6)`, only when built with `time_ids=True`: each view's SDXL micro-conditioning, (original
  height, width, crop top, crop left, height, width) (`ImageTransform.with_time_ids`).
The cache's rows are the groups' rows, shard after shard, group after group.

Text shards `text-00000.safetensors` (only with `cache_text`) hold `text_hidden` `(n, S, D)` and `text_mask` `(n, S)`
for caption rows: one row per unique caption, the last row the empty prompt used for caption dropout (the same
unconditional embedding the pipeline uses for CFG). `captions.json` lists the unique captions in row order (the empty
prompt not included); without `cache_text` the training loop encodes each batch's captions from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Image as ImageFeature
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .buckets import nearest_bucket
from .data.images import decode_rgb
from .latents import encode_posterior, scale_latents
from .text import encode_prompt

CACHE_VERSION = 3  # 3: shards, memory-mapped
INDEX = "index.json"
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # numpy has no bfloat16: read as 16-bit integers, viewed as bfloat16 by torch
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def open_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as memory-mapped CPU tensors (no copy: indexing reads the rows it takes, and
    the pages read are file-backed, not the process's anonymous memory), and the file's metadata."""
    with open(path, "rb") as file:
        (header_size,) = np.frombuffer(file.read(8), dtype="<u8")
        header = json.loads(file.read(int(header_size)))
    metadata = header.pop("__metadata__", {})
    # Copy-on-write ("c"): torch wants writable arrays; nothing writes to them, so no page is ever copied.
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + int(header_size))
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        array = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor
    return tensors, metadata


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Atomically: a shard file that exists is complete."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"shard": json.dumps(metadata)})
    os.replace(tmp, path)


@dataclass
class _Group:
    """Rows `[start, start + rows)` of the cache: one latent size, stored in one shard."""

    start: int
    rows: int
    tensors: dict[str, torch.Tensor]  # latent_mean, latent_std, caption_ids (and loss_mask, time_ids), memory-mapped


class LatentCache:
    """A built cache, opened memory-mapped: reading a batch reads only its rows.

    Args:
        folder (`str` or `Path`): the cache folder (`cache_dir/<key>`), complete (see [`cache_is_complete`]).
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.index = json.loads((folder / INDEX).read_text())
        self.captions: list[str] = json.loads((folder / "captions.json").read_text())
        self.groups: list[_Group] = []
        start = 0
        for name in self.index["latent_shards"]:
            tensors, metadata = open_safetensors(folder / name)
            for group in json.loads(metadata["shard"])["groups"]:
                names = {key: f"{key}.{group['name']}" for key in _KEYS}
                group_tensors = {key: tensors[name] for key, name in names.items() if name in tensors}
                self.groups.append(_Group(start, group["rows"], group_tensors))
                start += group["rows"]
        self._starts = torch.tensor([group.start for group in self.groups])
        self.has_loss_mask = "loss_mask" in self.groups[0].tensors
        self.has_time_ids = "time_ids" in self.groups[0].tensors
        self._text = [open_safetensors(folder / name)[0] for name in self.index["text_shards"]]
        self._text_starts = torch.tensor([0, *np.cumsum([len(t["text_mask"]) for t in self._text])[:-1].tolist()])

    def __len__(self) -> int:
        return self.index["num_rows"]

    @property
    def empty_prompt_id(self) -> int:
        return len(self.captions)

    @property
    def has_text(self) -> bool:
        """Whether text embeddings are cached (else the training loop encodes each batch's captions)."""
        return bool(self._text)

    def prompt(self, caption_id: int) -> str:
        """The caption of a caption row; `""` for `empty_prompt_id`."""
        return "" if caption_id == self.empty_prompt_id else self.captions[caption_id]

    def rows_by_size(self) -> dict[tuple[int, int], torch.Tensor]:
        """The rows of each latent size (aspect-ratio bucket), in row order."""
        sizes: dict[tuple[int, int], list[torch.Tensor]] = {}
        for group in self.groups:
            size = tuple(group.tensors["latent_mean"].shape[-2:])
            sizes.setdefault(size, []).append(torch.arange(group.start, group.start + group.rows))
        return {size: torch.cat(rows) for size, rows in sizes.items()}

    def _group_of(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"Cache rows must be in [0, {len(self)}), got {rows.min().item()}..{rows.max().item()}.")
        return torch.searchsorted(self._starts, rows, right=True) - 1

    def gather(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Tensor `key` (latent_mean, latent_std, caption_ids, loss_mask, time_ids) of `rows`, read from the shards;
        every row must have the same latent size."""
        groups = self._group_of(rows)
        parts = {g: self.groups[g] for g in groups.unique().tolist()}
        shapes = {tuple(group.tensors[key].shape[1:]) for group in parts.values()}
        if len(shapes) > 1:
            raise ValueError(f"Rows of different latent sizes {sorted(shapes)} cannot share a batch.")
        out = None
        for g, group in parts.items():
            here = groups == g
            values = group.tensors[key][rows[here] - group.start]
            if out is None:
                out = values.new_empty((rows.shape[0], *values.shape[1:]))
            out[here] = values
        return out

    def draw(
        self,
        indices: torch.Tensor,
        generator: torch.Generator,
        caption_dropout: float = 0.0,
        sample_posterior: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """Raw latents and caption rows for cache rows `indices`, all of one latent size (CPU tensors; move them
        yourself).

        Draws, with `generator`: the view (mirror or not), one caption per image, caption dropout to the empty
        prompt, and the posterior sample. Returns a dict of `latents` `(B, C, h, w)` before `scale_latents`,
        `caption_ids` `(B,)` indexing the caption rows (see `text` and `prompt`), and the drawn views' `loss_mask`
        `(B, 1, h, w)` and `time_ids` `(B, 6)` (None when the cache has none).
        """
        b = indices.shape[0]
        views = torch.randint(0, self.index["views"], (b,), generator=generator)
        mean = self.gather("latent_mean", indices)[torch.arange(b), views].float()
        std = self.gather("latent_std", indices)[torch.arange(b), views].float()
        latents = mean + std * torch.randn(mean.shape, generator=generator) if sample_posterior else mean

        ids = self.gather("caption_ids", indices)  # (B, K), -1 padded
        counts = (ids >= 0).sum(dim=1)
        pick = (torch.rand(b, generator=generator) * counts).long()
        caption = ids[torch.arange(b), pick]
        drop = torch.rand(b, generator=generator) < caption_dropout
        caption = torch.where(drop, torch.full_like(caption, self.empty_prompt_id), caption)
        out = {"latents": latents, "caption_ids": caption, "loss_mask": None, "time_ids": None}
        if self.has_loss_mask:
            out["loss_mask"] = self.gather("loss_mask", indices)[torch.arange(b), views].float()
        if self.has_time_ids:
            out["time_ids"] = self.gather("time_ids", indices)[torch.arange(b), views]
        return out

    def text(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached `(hidden (B, S, D), mask (B, S))` of caption rows `caption_ids` (B,), hidden in float32."""
        if not self.has_text:
            raise ValueError("This cache holds no text embeddings (built with cache_text=False): encode the captions.")
        shard = torch.searchsorted(self._text_starts, caption_ids, right=True) - 1
        first = self._text[0]
        hidden = torch.empty((len(caption_ids), *first["text_hidden"].shape[1:]), dtype=torch.float32)
        mask = first["text_mask"].new_empty((len(caption_ids), *first["text_mask"].shape[1:]))
        for s in shard.unique().tolist():
            here = shard == s
            local = caption_ids[here] - self._text_starts[s]
            hidden[here] = self._text[s]["text_hidden"][local].float()
            mask[here] = self._text[s]["text_mask"][local]
        return hidden, mask


_KEYS = ("latent_mean", "latent_std", "caption_ids", "loss_mask", "time_ids")


def cache_is_complete(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def tensor_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's config (when it has one) and every parameter and buffer."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:  # diffusers' FrozenDict or a transformers PretrainedConfig
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset) -> str:
    """The `datasets` fingerprint: a hash of the source files (or generator arguments) and every transform."""
    return dataset._fingerprint


def cache_key(**parts) -> str:
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _caption_lists(captions: list) -> list[list[str]]:
    return [c if isinstance(c, (list, tuple)) else [c] for c in captions]


@dataclass
class CacheLayout:
    """How a cache is cut and stored; the same for every process of a build."""

    num_source_rows: int
    num_captions: int  # unique captions, the empty prompt not included
    shard_size: int = 4096  # source rows (images) per latent shard, and caption rows per text shard
    dtype: torch.dtype = torch.float16  # of the latents' moments and the text embeddings
    cache_text: bool = True

    @property
    def num_latent_shards(self) -> int:
        return math.ceil(self.num_source_rows / self.shard_size)

    @property
    def num_text_shards(self) -> int:
        return math.ceil((self.num_captions + 1) / self.shard_size) if self.cache_text else 0

    def shards_of(self, process_index: int, num_processes: int) -> list[int]:
        """The shards (latent shards, then text shards numbered after them) one process builds."""
        total = self.num_latent_shards + self.num_text_shards
        return list(range(process_index, total, num_processes))


@torch.no_grad()
def build_latent_cache(
    dataset,
    folder: str | Path,
    *,
    image_column: str,
    caption_column: str,
    transform,
    vae,
    tokenizer,
    text_encoder,
    random_flip: bool,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float16,
    cache_text: bool = True,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    use_attention_mask: bool = True,
    loss_mask: bool = False,
    min_image_size: int = 8,
    buckets: list[tuple[int, int]] | None = None,
    time_ids: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> None:
    """Encode this process's shards of the cache of `dataset` into `folder` (those missing: a killed build resumes);
    once every process has, [`finish_latent_cache`] on one of them makes the cache complete.

    `transform` is an `ImageTransform` without flips (the mirror is the second view when `random_flip`); `seed` and the
    shard number fix its random crops, so the same inputs give the same cache whatever the number of processes.
    `use_attention_mask` is passed to `encode_prompt` (how the model being trained reads the text). `loss_mask` also
    keeps each image's alpha channel (`transform.with_alpha`), averaged over each latent pixel's patch. Images that do
    not decode, or have a side below `min_image_size`, are skipped and counted in the shard's metadata. With
    `buckets` (`(height, width)` sizes, `latentddpm.buckets`), each image is resized and cropped to the bucket of its
    aspect ratio instead of the square; `time_ids` also keeps each view's size and crop (SDXL's micro-conditioning).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(dataset.features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))  # reading a row never decodes
    captions = _caption_lists(dataset[caption_column])
    unique = sorted({c for caps in captions for c in caps})
    layout = CacheLayout(len(dataset), len(unique), shard_size, dtype, cache_text)
    views = 2 if random_flip else 1
    if process_index == 0:
        (folder / "captions.json").write_text(json.dumps(unique))
        (folder / "layout.json").write_text(json.dumps(_layout_json(layout, views)))

    mine = [s for s in layout.shards_of(process_index, num_processes) if not _shard_path(folder, layout, s).is_file()]
    latent_shards = [s for s in mine if s < layout.num_latent_shards]
    text_shards = [s - layout.num_latent_shards for s in mine if s >= layout.num_latent_shards]
    images = sum(min(shard_size, len(dataset) - s * shard_size) for s in latent_shards)
    progress = tqdm(
        total=images,
        desc=f"Caching latents (process {process_index + 1}/{num_processes})",
        unit="img",
        disable=not show_progress,
    )
    index = {c: i for i, c in enumerate(unique)}
    width = max(len(caps) for caps in captions)
    for shard in latent_shards:
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(dataset))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
        encoder = _ShardEncoder(vae, views, batch_size, device)
        skipped = {"corrupt": 0, "too small": 0}
        for offset, image in enumerate(dataset[start:stop][image_column]):
            rgb, reason = decode_rgb(image, min_size=min_image_size)
            progress.update(1)
            if reason is not None:
                skipped[reason] += 1
                continue
            size = nearest_bucket(*rgb.size, buckets) if buckets else None
            ids = _time_ids(transform, rgb, size, generator) if time_ids else None
            if loss_mask:
                encoder.add(start + offset, *transform.with_alpha(image, generator, size), ids)
            else:
                encoder.add(start + offset, transform(rgb, generator, size), None, ids)
        tensors, groups = {}, []
        for name, (rows, mean, std, extra) in encoder.finish().items():
            ids = torch.full((len(rows), width), -1, dtype=torch.long)
            for row, source_row in enumerate(rows):
                ids[row, : len(captions[source_row])] = torch.tensor([index[c] for c in captions[source_row]])
            tensors |= {f"latent_mean.{name}": mean.to(dtype), f"latent_std.{name}": std.to(dtype)}
            tensors[f"caption_ids.{name}"] = ids
            tensors |= {f"{key}.{name}": value for key, value in extra.items()}  # loss_mask, time_ids
            groups.append({"name": name, "rows": len(rows)})
        _write_shard(tensors, _shard_path(folder, layout, shard), {"groups": groups, "skipped": skipped})
    progress.close()

    prompts = unique + [""]  # the empty prompt last: caption dropout and CFG's unconditional branch
    for shard in text_shards:
        hidden, mask = [], []
        for start in range(shard * shard_size, min((shard + 1) * shard_size, len(prompts)), batch_size):
            stop = min(start + batch_size, (shard + 1) * shard_size, len(prompts))
            h, m = encode_prompt(
                prompts[start:stop], tokenizer, text_encoder, device, use_attention_mask=use_attention_mask
            )
            hidden.append(h.to(dtype).cpu())
            mask.append(m.cpu())
        path = _shard_path(folder, layout, layout.num_latent_shards + shard)
        _write_shard({"text_hidden": torch.cat(hidden), "text_mask": torch.cat(mask)}, path, {})


def _time_ids(transform, rgb, size: tuple[int, int] | None, generator: torch.Generator) -> torch.Tensor:
    """`(2, 6)`: the SDXL time ids of the image and of its mirror (the crop's left edge seen from the other side), from
    a copy of `generator`, whose draws the transform then makes itself."""
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    (_, resized_width), (top, left) = transform.crop_box((rgb.height, rgb.width), size, copy)
    height, width = size or (transform.resolution, transform.resolution)
    mirror_left = resized_width - left - width
    return torch.tensor([[rgb.height, rgb.width, top, x, height, width] for x in (left, mirror_left)])


class _ShardEncoder:
    """Encodes a shard's images a batch at a time, a batch per image size (aspect-ratio bucket), so that memory holds
    at most a batch of pixels per size; `finish` returns, per size, the source rows, their posterior moments and
    their loss masks and time ids where there are any."""

    def __init__(self, vae, views: int, batch_size: int, device):
        self.vae, self.views, self.batch_size, self.device = vae, views, batch_size, device
        self.pending: dict[tuple[int, int], list] = {}  # image size -> [(source row, pixels, alpha, time ids)]
        self.done: dict[tuple[int, int], list] = {}  # image size -> [(rows, mean, std, extra)] per encoded batch

    def add(self, row: int, pixels: torch.Tensor, alpha: torch.Tensor | None, time_ids: torch.Tensor | None) -> None:
        size = tuple(pixels.shape[-2:])
        self.pending.setdefault(size, []).append((row, pixels, alpha, time_ids))
        if len(self.pending[size]) == self.batch_size:
            self._encode(size)

    def _encode(self, size: tuple[int, int]) -> None:
        rows, pixels, alphas, time_ids = zip(*self.pending.pop(size))
        batch = torch.stack(pixels).to(self.device, self.vae.dtype)
        moments = [encode_posterior(self.vae, view) for view in [batch, batch.flip(-1)][: self.views]]
        mean = torch.stack([m.float().cpu() for m, _ in moments], dim=1)  # (B, views, C, h, w)
        std = torch.stack([s.float().cpu() for _, s in moments], dim=1)
        extra = {}
        if alphas[0] is not None:
            # Area averaging: a latent pixel's weight is the opacity of the image patch it encodes.
            alpha = F.interpolate(torch.stack(alphas), size=mean.shape[-2:], mode="area")
            extra["loss_mask"] = torch.stack([alpha, alpha.flip(-1)][: self.views], dim=1)
        if time_ids[0] is not None:
            extra["time_ids"] = torch.stack(time_ids)[:, : self.views]
        self.done.setdefault(size, []).append((list(rows), mean, std, extra))

    def finish(self) -> dict[str, tuple[list[int], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """Per latent size `"hxw"`, in the order of image sizes: `(source rows, mean, std, {loss_mask, time_ids})`."""
        for size in list(self.pending):
            self._encode(size)
        out = {}
        for size in sorted(self.done):
            rows, means, stds, extras = zip(*self.done[size])
            mean = torch.cat(means)
            extra = {key: torch.cat([e[key] for e in extras]) for key in extras[0]}
            out[f"{mean.shape[-2]}x{mean.shape[-1]}"] = (sum(rows, []), mean, torch.cat(stds), extra)
        return out


def _shard_path(folder: Path, layout: CacheLayout, shard: int) -> Path:
    if shard < layout.num_latent_shards:
        return folder / f"latents-{shard:05d}.safetensors"
    return folder / f"text-{shard - layout.num_latent_shards:05d}.safetensors"


def _layout_json(layout: CacheLayout, views: int) -> dict:
    return {
        "version": CACHE_VERSION,
        "num_source_rows": layout.num_source_rows,
        "num_captions": layout.num_captions,
        "shard_size": layout.shard_size,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "cache_text": layout.cache_text,
        "views": views,
    }


def finish_latent_cache(folder: str | Path) -> dict:
    """Once every process's [`build_latent_cache`] has returned: write `index.json`, which makes the cache complete,
    and return it (with the images skipped, by reason)."""
    folder = Path(folder)
    layout = json.loads((folder / "layout.json").read_text())
    latent_shards = sorted(p.name for p in folder.glob("latents-*.safetensors"))
    text_shards = sorted(p.name for p in folder.glob("text-*.safetensors"))
    num_rows, skipped = 0, {"corrupt": 0, "too small": 0}
    for name in latent_shards:
        _, metadata = open_safetensors(folder / name)
        shard = json.loads(metadata["shard"])
        num_rows += sum(group["rows"] for group in shard["groups"])
        skipped = {reason: skipped[reason] + shard["skipped"][reason] for reason in skipped}
    index = layout | {
        "num_rows": num_rows,
        "skipped": skipped,
        "latent_shards": latent_shards,
        "text_shards": text_shards,
    }
    if num_rows == 0:
        raise ValueError(f"No usable image in the dataset (skipped {skipped}); nothing to cache.")
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, folder / INDEX)
    return index


def latent_stats(cache: LatentCache, vae, max_rows: int = 4096) -> dict[str, float]:
    """Mean and std of the scaled latents (posterior means of the first view) of the first rows of the cache's first
    latent size, e.g. to check `scaling_factor` is right (std ~ 1)."""
    rows = next(iter(cache.rows_by_size().values()))[:max_rows]
    scaled = scale_latents(vae, cache.gather("latent_mean", rows)[:, 0].float())
    return {"latent_mean": scaled.mean().item(), "latent_std": scaled.std().item()}
