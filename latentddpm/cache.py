"""Precomputed latents and text embeddings, so training never runs the VAE or the text encoder.

The cache lives in `cache_dir/<key>/`, where the key hashes everything the cached tensors depend on: the
dataset fingerprint, the VAE and text encoder weights and configs, the tokenizer length and the image
transform. A second run with the same inputs loads it instead of encoding again; any change makes a new key.

What is stored (safetensors):
- `latent_mean`, `latent_std` of shape `(N, F, C, h, w)`: the VAE posterior before scaling, for `F` views of
  each image (1, or 2 when random flips are on: the image and its mirror). Training samples
  `mean + std * eps` each step, as LDM does, then applies `scale_latents`. `std` is zero for AutoencoderTiny.
- `text_hidden` `(U + 1, S, D)` and `text_mask` `(U + 1, S)`: one row per unique caption, the last row the
  empty prompt used for caption dropout (the same unconditional embedding the pipeline uses for CFG).
- `caption_ids` `(N, K)`: indices into the caption rows for each image's K captions, -1 where an image has fewer.
- `loss_mask` `(N, F, 1, h, w)`, only when built with `loss_mask=True`: each view's alpha channel (ones for an
  opaque image) averaged down to the latent grid, the weights of `masked_loss` training.
- `captions.json`: the unique captions themselves, in the order of the caption rows (the empty prompt not included),
  for training the text encoder, which encodes the drawn captions anew each step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .latents import encode_posterior, scale_latents
from .text import encode_prompt

CACHE_VERSION = 2  # 2: captions.json


@dataclass
class LatentCache:
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    caption_ids: torch.Tensor
    text_hidden: torch.Tensor
    text_mask: torch.Tensor
    captions: list[str]  # the unique captions, row i of `text_hidden` for i < empty_prompt_id
    loss_mask: torch.Tensor | None = None  # (N, F, 1, h, w) alpha on the latent grid, when built with masks

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    @property
    def empty_prompt_id(self) -> int:
        return self.text_hidden.shape[0] - 1

    def prompt(self, caption_id: int) -> str:
        """The caption of a caption row; `""` for `empty_prompt_id`."""
        return "" if caption_id == self.empty_prompt_id else self.captions[caption_id]

    def draw(
        self,
        indices: torch.Tensor,
        vae,
        generator: torch.Generator,
        caption_dropout: float = 0.0,
        sample_posterior: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Latents and caption rows for dataset rows `indices` (CPU tensors; move them yourself).

        Draws, with `generator`: the view (mirror or not), one caption per image, caption dropout to the empty
        prompt, and the posterior sample. Returns `(latents (B, C, h, w), caption_ids (B,), loss_mask)`, the latents
        already scaled with `scale_latents(vae, ...)`, `caption_ids` indexing `text_hidden` (see `text` and
        `prompt`), `loss_mask` `(B, 1, h, w)` the drawn views' masks (None when the cache has none).
        """
        b = indices.shape[0]
        views = torch.randint(0, self.latent_mean.shape[1], (b,), generator=generator)
        mean = self.latent_mean[indices, views].float()
        std = self.latent_std[indices, views].float()
        latents = mean + std * torch.randn(mean.shape, generator=generator) if sample_posterior else mean

        ids = self.caption_ids[indices]  # (B, K), -1 padded
        counts = (ids >= 0).sum(dim=1)
        pick = (torch.rand(b, generator=generator) * counts).long()
        caption = ids[torch.arange(b), pick]
        drop = torch.rand(b, generator=generator) < caption_dropout
        caption = torch.where(drop, torch.full_like(caption, self.empty_prompt_id), caption)
        loss_mask = None if self.loss_mask is None else self.loss_mask[indices, views]
        return scale_latents(vae, latents), caption, loss_mask

    def text(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached `(hidden (B, S, D), mask (B, S))` of caption rows `caption_ids` (B,)."""
        return self.text_hidden[caption_ids].float(), self.text_mask[caption_ids]


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


@torch.no_grad()
def build_latent_cache(
    dataset,
    *,
    image_column: str,
    caption_column: str,
    transform,
    vae,
    tokenizer,
    text_encoder,
    random_flip: bool,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    seed: int = 0,
    use_attention_mask: bool = True,
    loss_mask: bool = False,
) -> LatentCache:
    """Encode every image (and its mirror when `random_flip`) and every unique caption once.

    `seed` fixes the random crops (when the transform crops at random), so the same inputs give the same cache.
    `use_attention_mask` is passed to `encode_prompt` (how the model being trained reads the text). `loss_mask` also
    keeps each image's alpha channel (`transform.with_alpha`), averaged over each latent pixel's patch.
    """
    views = 2 if random_flip else 1
    generator = torch.Generator().manual_seed(seed)
    means, stds, masks = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Caching latents", disable=not show_progress):
        rows = dataset[start : start + batch_size]
        if loss_mask:
            pixels, alpha = map(torch.stack, zip(*(transform.with_alpha(i, generator) for i in rows[image_column])))
        else:
            pixels = torch.stack([transform(image, generator=generator) for image in rows[image_column]])
        pixels = pixels.to(device, vae.dtype)
        batch_views = [pixels, pixels.flip(-1)][:views]
        mean_views, std_views = [], []
        for view in batch_views:
            # The posterior, sampled per step (std is zero for the deterministic AutoencoderTiny).
            mean, std = encode_posterior(vae, view)
            mean_views.append(mean.float().cpu())
            std_views.append(std.float().cpu())
        means.append(torch.stack(mean_views, dim=1))
        stds.append(torch.stack(std_views, dim=1))
        if loss_mask:
            # Area averaging: a latent pixel's weight is the opacity of the image patch it encodes.
            alpha = F.interpolate(alpha, size=means[-1].shape[-2:], mode="area")
            masks.append(torch.stack([alpha, alpha.flip(-1)][:views], dim=1))

    captions = _caption_lists(dataset[caption_column])
    unique = sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(unique)}
    width = max(len(caps) for caps in captions)
    caption_ids = torch.full((len(captions), width), -1, dtype=torch.long)
    for row, caps in enumerate(captions):
        caption_ids[row, : len(caps)] = torch.tensor([index[c] for c in caps])

    hidden, mask = [], []
    prompts = unique + [""]  # the empty prompt last: caption dropout and CFG's unconditional branch
    for start in range(0, len(prompts), batch_size):
        h, m = encode_prompt(
            prompts[start : start + batch_size], tokenizer, text_encoder, device, use_attention_mask=use_attention_mask
        )
        hidden.append(h.float().cpu())
        mask.append(m.cpu())
    return LatentCache(
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        caption_ids=caption_ids,
        text_hidden=torch.cat(hidden),
        text_mask=torch.cat(mask),
        captions=unique,
        loss_mask=torch.cat(masks) if loss_mask else None,
    )


def save_latent_cache(cache: LatentCache, folder: str | Path) -> None:
    """Write atomically: a partial cache is never loaded."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp / "cache.safetensors"))
    (tmp / "captions.json").write_text(json.dumps(cache.captions))
    tmp.replace(folder)


def load_latent_cache(folder: str | Path) -> LatentCache | None:
    path = Path(folder) / "cache.safetensors"
    if not path.is_file():
        return None
    return LatentCache(**load_file(str(path)), captions=json.loads((Path(folder) / "captions.json").read_text()))


def latent_stats(cache: LatentCache, vae) -> dict[str, float]:
    """Mean and std of the scaled latents (posterior means), e.g. to check `scaling_factor` is right (std ~ 1)."""
    scaled = scale_latents(vae, cache.latent_mean[:, 0])
    return {"latent_mean": scaled.mean().item(), "latent_std": scaled.std().item()}
