"""DreamBooth (Ruiz et al. 2023, https://arxiv.org/abs/2208.12242): a new subject from a few images, the class kept.

The subject's images (`instance_data`) are a folder of images, each captioned by the same-stem `.txt` file beside it
(kohya's sd-scripts and diffusers' convention) or else by `instance_prompt`. Prior preservation trains, in the same
step, on images of the subject's class that the base pipeline generated before fine-tuning, so that the class prompts
keep giving what they gave: loss = instance loss + `prior_loss_weight` * class loss (Ruiz et al., equation 2).

Class images are generated once and kept on disk, `NNNNN.png` with its prompt in `NNNNN.txt` (the instance folder's
own layout), and `class_images.json` recording what made them. Image `i` has prompt `prompts[i % len(prompts)]` and
its own seeded noise, and is generated in the fixed group `i // batch_size`, so it is the same image however often
the generation was interrupted: each file is written to a temporary name and renamed, a complete group is skipped,
and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import step_generator
from .cache import cache_key, tensor_fingerprint
from .config import ConfigError
from .data.images import decode_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Class image i draws its noise from step_generator(seed, i, CLASS_IMAGE_STREAM): a stream no training step uses.
CLASS_IMAGE_STREAM = 20_000
CLASS_IMAGES_RECORD = "class_images.json"


def read_image_folder(
    folder: str | Path, default_caption: str | None, min_size: int = 1, key: str = "instance_data"
) -> list[tuple[Path, str]]:
    """The images of `folder` (sorted by name) with their captions: a same-stem `.txt` file's text, else
    `default_caption`.

    Args:
        folder (`str` or `Path`): the folder; images are files ending in one of `IMAGE_EXTENSIONS`.
        default_caption (`str`, *optional*): the caption of images without a `.txt` file.
        min_size (`int`, defaults to 1): the smallest accepted side, in pixels.
        key (`str`): the config key that named the folder, for error messages.

    Returns:
        `list[tuple[Path, str]]`: `(image path, caption)` rows.

    Raises:
        ConfigError: no such folder, no image in it, an image that does not decode or is too small, or one without
            a caption.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"Config key '{key}': no such folder {str(folder)!r}.")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ConfigError(f"Config key '{key}': no image ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}.")
    rows = []
    for path in images:
        _, reason = decode_rgb(path, min_size=min_size)
        if reason is not None:
            raise ConfigError(f"Config key '{key}': {str(path)!r} is {reason}.")
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else default_caption
        if caption is None:
            raise ConfigError(
                f"Config key '{key}': {path.name} has no caption; write {caption_file.name} or set instance_prompt."
            )
        rows.append((path, caption))
    return rows


def read_prompts(prompt: str | list[str], key: str = "class_prompt") -> list[str]:
    """A list of prompts from one prompt, a list, or a `.txt` file of one prompt per line (blank lines skipped)."""
    if isinstance(prompt, list):
        prompts = prompt
    elif prompt.endswith(".txt"):
        if not Path(prompt).is_file():
            raise ConfigError(f"Config key '{key}': no such prompt file {prompt!r}.")
        prompts = [line.strip() for line in Path(prompt).read_text().splitlines() if line.strip()]
    else:
        prompts = [prompt]
    if not prompts:
        raise ConfigError(f"Config key '{key}' holds no prompt.")
    return prompts


def rows_fingerprint(rows: list[tuple[Path, str]]) -> str:
    """A hash of the bytes of every image and its caption, in order: what a cache of these rows depends on."""
    digest = hashlib.sha256()
    for path, caption in rows:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(hashlib.sha256(caption.encode()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ClassImageSettings:
    """How class images are sampled (the `train_ldm` keys `class_prompt`, `resolution`, `class_inference_steps`,
    `class_guidance_scale`, `seed`, `sample_batch_size`)."""

    prompts: tuple[str, ...]  # image i gets prompts[i % len(prompts)]
    resolution: int  # height and width, in pixels
    num_inference_steps: int
    guidance_scale: float
    seed: int  # image i's noise: step_generator(seed, i, CLASS_IMAGE_STREAM)
    batch_size: int  # images per pipeline call; part of what an image is (a batch's numerics depend on its size)

    def key(self, pipeline) -> str:
        """A hash of these settings and of everything in `pipeline` that sampling reads."""
        return cache_key(
            settings=asdict(self),
            unet=tensor_fingerprint(pipeline.unet),
            vae=tensor_fingerprint(pipeline.vae),
            text_encoder=tensor_fingerprint(pipeline.text_encoder),
            max_length=pipeline.tokenizer.model_max_length,
            scheduler=dict(pipeline.scheduler.config),
            use_attention_mask=pipeline.config.use_attention_mask,
        )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, then rename it to `path`: `path` either is complete or does not exist."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@torch.no_grad()
def generate_class_images(
    pipeline,
    settings: ClassImageSettings,
    key: str,
    num_images: int,
    folder: str | Path,
    show_progress: bool = True,
) -> list[tuple[Path, str]]:
    """Class images `0 .. num_images - 1` in `folder`, generated by `pipeline` where missing (see the module's
    docstring for the layout and why a killed generation resumes with the same images).

    Args:
        pipeline (`LatentDDPMPipeline`): the base, as it is before fine-tuning.
        settings (`ClassImageSettings`): prompts and sampling settings.
        key (`str`): `settings.key(pipeline)` (a hash of the whole pipeline: the caller may have it already).
        num_images (`int`): how many; more than a previous run extends its images, fewer uses the first ones.
        folder (`str` or `Path`): where they are (created when missing).

    Returns:
        `list[tuple[Path, str]]`: `(image path, prompt)` rows, image `i` first.

    Raises:
        ConfigError: `folder` holds class images of other settings or another pipeline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"key": key, **asdict(settings)}
    record["prompts"] = list(settings.prompts)  # as JSON reads it back
    record_path = folder / CLASS_IMAGES_RECORD
    if record_path.is_file() and json.loads(record_path.read_text()) != record:
        raise ConfigError(
            f"Config key 'class_data_dir': {str(folder)!r} holds class images of another base pipeline or other "
            "settings; delete it or choose another folder."
        )
    _write_atomically(record_path, json.dumps(record, indent=2).encode())

    rows = [(folder / f"{i:05d}.png", settings.prompts[i % len(settings.prompts)]) for i in range(num_images)]
    missing = [i for i, (path, _) in enumerate(rows) if not path.is_file()]
    groups = sorted({i // settings.batch_size for i in missing})
    pipeline.set_progress_bar_config(disable=True)
    progress = tqdm(
        total=num_images, initial=num_images - len(missing), desc="Class images", disable=not show_progress
    )
    for group in groups:
        # The whole group, even if some of it exists: an image's numerics depend on the batch it was made in.
        indices = range(group * settings.batch_size, min((group + 1) * settings.batch_size, num_images))
        images = pipeline(
            [rows[i][1] for i in indices],
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=[step_generator(settings.seed, i, CLASS_IMAGE_STREAM) for i in indices],
        ).images
        for i, image in zip(indices, images):
            path, prompt = rows[i]
            if not path.is_file():
                # The caption first: the image's arrival marks the pair complete.
                _write_atomically(path.with_suffix(".txt"), prompt.encode())
                png = io.BytesIO()
                image.save(png, format="PNG")
                _write_atomically(path, png.getvalue())
                progress.update(1)
    progress.close()
    return rows


def prior_preservation_loss(losses: torch.Tensor, num_instance: int, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's loss from per-sample losses `(B,)` whose first `num_instance` are instance rows and the rest
    class rows: their mean + `prior_loss_weight` * the class rows' mean (as diffusers' `train_dreambooth.py`)."""
    return losses[:num_instance].mean() + prior_loss_weight * losses[num_instance:].mean()
