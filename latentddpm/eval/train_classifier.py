"""`latentddpm train-classifier`: train the reference classifier whose features stand in for Inception-v3 in FID/KID
(`latentddpm evaluate --classifier`).

Usage:

    latentddpm train-classifier --dataset ../shared/datasets/cifar10/train.parquet --output_dir outputs/classifier

Keys can also come from a YAML file (`--config classifier.yaml`); `latentddpm train-classifier --help` lists them.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import ConfigError, non_negative, parse_config, positive
from ..data.sources import load_image_caption_dataset
from .classifier import ReferenceClassifier
from .features import iter_pixel_batches

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainClassifierConfig:
    """Settings of `latentddpm train-classifier`."""

    dataset: str = ""  # parquet file(s), a folder or a Hub dataset with a ClassLabel column (required)
    image_column: str = "image"  # column holding the images
    caption_column: str = "text"  # column holding the captions (checked to exist by the dataset loader)
    label_column: str = "label"  # the ClassLabel column: the classes to learn
    resolution: int = positive(32)  # images are centre-cropped and resized to this square
    max_train_steps: int = positive(3000)  # optimizer steps
    train_batch_size: int = positive(128)  # images per step
    learning_rate: float = positive(2e-3)  # peak AdamW learning rate (cosine decay after a 5% warmup)
    adam_weight_decay: float = non_negative(5e-4)  # AdamW weight decay
    num_heldout: int = positive(5000)  # rows held out to measure accuracy; at most half the dataset
    seed: int = 0  # seeds the split, the initialisation, batches and augmentation
    max_minutes: float | None = positive(None)  # stop training after this many minutes
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # channels of each stage of the CNN
    feature_dim: int = positive(128)  # size of the feature vector (the penultimate layer)
    output_dir: str = "outputs/classifier"  # the classifier (config.json, safetensors) and metrics.json go here

    def validate(self) -> None:
        if not self.dataset:
            raise ConfigError("Config key 'dataset' is required: a class-labelled image dataset.")


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    # images in [0, 1] that came from 8-bit pixels: exact
    return (images * 255).round().to(torch.uint8)


def _augment(pixels: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """uint8 (B, 3, R, R) -> float in [-1, 1] with the standard CIFAR augmentation: a random R x R crop of the image
    reflection-padded by `padding`, and a horizontal flip with probability 1/2 (He et al. 2016, sec. 4.2)."""
    batch, _, size, _ = pixels.shape
    images = F.pad(pixels.float() / 127.5 - 1, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(size)  # (B, R)
    cols = offsets[:, 1, None] + torch.arange(size)
    flip = torch.rand(batch, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_index = torch.arange(batch)[:, None, None]
    # (B, R, R, 3) by advanced indexing over the batch, row and column dimensions, then back to (B, 3, R, R)
    return images.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def classifier_accuracy(classifier: ReferenceClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images `pixels` of shape `(N, 3, R, R)` that `classifier` assigns their `labels` `(N,)`."""
    classifier.eval()
    correct = 0
    for start in range(0, len(pixels), 512):
        logits = classifier(pixels[start : start + 512].float() / 127.5 - 1)
        correct += int((logits.argmax(dim=1) == labels[start : start + 512]).sum())
    return correct / len(pixels)


def train_reference_classifier(dataset: Dataset, config: TrainClassifierConfig) -> tuple[ReferenceClassifier, dict]:
    """Train a [`ReferenceClassifier`] on a class-labelled image dataset, measure it on held-out rows and save both
    to `config.output_dir` (`config.json`, safetensors weights, `metrics.json`).

    AdamW with a cosine learning rate after a 5% warmup, random crops and flips. A seeded permutation splits off
    `config.num_heldout` rows that it never trains on.

    Args:
        dataset (`datasets.Dataset`): rows with `config.image_column` and a `ClassLabel` `config.label_column`.
        config (`TrainClassifierConfig`): the settings (`dataset`, the path, is not read here).

    Returns:
        `(classifier, metrics)`: the classifier in eval mode, and `heldout_accuracy`, `train_accuracy` (on as many
        training rows as held-out ones), `steps`, `num_train`, `num_heldout`, `seconds`, `seed`.
    """
    feature = dataset.features.get(config.label_column)
    if not isinstance(feature, ClassLabel):
        raise ConfigError(
            f"Config key 'label_column': {config.label_column!r} must be a ClassLabel column; the dataset has "
            f"{dict(dataset.features)}."
        )
    num_heldout, seed = config.num_heldout, config.seed
    if num_heldout > len(dataset) // 2:
        raise ConfigError(
            f"Config key 'num_heldout' must be at most half the dataset ({len(dataset) // 2}), got {num_heldout}."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    dataset = dataset.select(order)
    pixels = torch.cat(
        [
            _to_uint8(batch)
            for batch in tqdm(
                iter_pixel_batches(dataset, config.resolution, 1000, config.image_column),
                total=-(-len(dataset) // 1000),
                desc="decoding images",
            )
        ]
    )
    labels = torch.tensor(dataset[config.label_column])
    train_pixels, train_labels = pixels[num_heldout:], labels[num_heldout:]
    heldout_pixels, heldout_labels = pixels[:num_heldout], labels[:num_heldout]

    torch.manual_seed(seed)
    classifier = ReferenceClassifier(
        class_names=list(feature.names),
        resolution=config.resolution,
        block_out_channels=tuple(config.block_out_channels),
        feature_dim=config.feature_dim,
    )
    optimizer = torch.optim.AdamW(
        classifier.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay
    )
    num_steps, max_minutes = config.max_train_steps, config.max_minutes
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=max(1, num_steps // 20), num_training_steps=num_steps
    )
    classifier.train()
    start = time.monotonic()
    progress = tqdm(range(num_steps), desc="training classifier")
    step = 0
    for step in progress:
        if max_minutes is not None and time.monotonic() - start > max_minutes * 60:
            logger.info(f"Stopping after {max_minutes} minutes at step {step} of {num_steps}.")
            break
        index = torch.randint(0, len(train_pixels), (config.train_batch_size,), generator=generator)
        loss = F.cross_entropy(classifier(_augment(train_pixels[index], generator)), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    else:
        step = num_steps
    seconds = time.monotonic() - start

    metrics = {
        "heldout_accuracy": classifier_accuracy(classifier, heldout_pixels, heldout_labels),
        "train_accuracy": classifier_accuracy(classifier, train_pixels[:num_heldout], train_labels[:num_heldout]),
        "steps": step,
        "num_train": len(train_pixels),
        "num_heldout": num_heldout,
        "seconds": round(seconds, 1),
        "seed": seed,
    }
    output_dir = Path(config.output_dir)
    classifier.save_pretrained(output_dir)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return classifier, metrics


def main(argv: list[str] | None = None) -> dict:
    """`latentddpm train-classifier --dataset PATH [--key value ...]`; returns the held-out metrics."""
    config = parse_config(TrainClassifierConfig, argv)
    dataset = load_image_caption_dataset(
        config.dataset, image_column=config.image_column, caption_column=config.caption_column
    )
    _, metrics = train_reference_classifier(dataset, config)
    print(json.dumps(metrics, indent=2))
    print(f"saved the classifier to {config.output_dir}")
    return metrics
