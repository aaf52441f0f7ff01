"""Feature networks for FID/KID: Inception-v3 with the FID weights when they are on disk, else a small classifier that
we train on the reference dataset.

FID is only comparable across papers when computed with the TensorFlow Inception-v3 of Heusel et al. 2017 (the
`pt_inception-2015-12-05-6726825d.pth` port of pytorch-fid and torch-fidelity). That network is used when its weights
are found locally and torch-fidelity or pytorch-fid is installed to build it. Otherwise a small CNN trained here on
the reference data (e.g. CIFAR-10) gives the features: its penultimate layer for FID/KID and its logits for the class
accuracy of generated images. Numbers from it are labelled "classifier features (not comparable to published FID)"
everywhere they are shown; they rank models and settings against each other, nothing more.

Train the classifier once with

    python -m latentddpm.eval.features --train-classifier --data ../shared/datasets/cifar10/train.parquet \
        --out outputs/cifar_classifier
"""

import argparse
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.optimization import get_scheduler
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import ImageTransform

logger = logging.getLogger(__name__)

# File name of the FID Inception weights in the torch hub cache, as pytorch-fid downloads them; torch-fidelity's
# `weights-inception-2015-12-05-6726825d.pth` is the same file (same SHA-256 prefix).
FID_INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
CLASSIFIER_DESCRIPTION = "classifier features (not comparable to published FID)"
INCEPTION_DESCRIPTION = "Inception-v3 pool3 features, FID weights (comparable to published FID)"


class FeatureExtractor:
    """Maps images to the feature vectors FID and KID compare.

    Attributes:
        extractor_id (`str`): names the network and its weights; half of the key of cached reference statistics.
        description (`str`): what the features are; shown next to every number computed from them.
    """

    extractor_id: str
    description: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): RGB images in `[0, 1]`, any size.

        Returns:
            `torch.Tensor` of shape `(B, D)`, float32.
        """
        raise NotImplementedError


def find_inception_weights(path: str | Path | None = None) -> Path | None:
    """The FID Inception weights: `path` when given (it must exist), else the torch hub cache file
    `<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth` when present, else `None`."""
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(
                f"Inception weights {str(path)!r} do not exist; pass the path of {FID_INCEPTION_WEIGHTS_NAME}."
            )
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_WEIGHTS_NAME
    return cached if cached.is_file() else None


class InceptionFeatureExtractor(FeatureExtractor):
    """The 2048-d pool3 features of the FID Inception-v3, built by torch-fidelity (any weights path) or pytorch-fid
    (weights in the torch hub cache). Both resize to 299x299 the way the TensorFlow original does.

    Args:
        weights_path (`str` or `Path`): the `pt_inception-2015-12-05-6726825d.pth` file.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the network runs.
    """

    extractor_id = "inception-v3-fid-2015-12-05"
    description = INCEPTION_DESCRIPTION

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        model, self.takes_uint8 = _build_fid_inception(Path(weights_path))
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if self.takes_uint8:  # torch-fidelity takes 8-bit images, as the TensorFlow graph did
            return self.model((images * 255).round().clamp(0, 255).to(torch.uint8))[0].float().cpu()
        return self.model(images)[0].flatten(1).float().cpu()


def _build_fid_inception(weights_path: Path) -> tuple[nn.Module, bool]:
    """The FID Inception-v3 from torch-fidelity, else pytorch-fid; and whether it takes uint8 images."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        pass
    else:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(weights_path)), True
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as error:
        raise ImportError(
            "The FID Inception-v3 needs `torch-fidelity` or `pytorch-fid` (`pip install 'latentddpm[fid]'`); without "
            "them use the reference classifier (`--features classifier`)."
        ) from error
    cached = find_inception_weights()
    if cached is None or weights_path.resolve() != cached.resolve():
        raise ValueError(
            f"pytorch-fid reads the Inception weights only from the torch hub cache, not from {str(weights_path)!r};"
            f" copy them to {Path(torch.hub.get_dir()) / 'checkpoints' / FID_INCEPTION_WEIGHTS_NAME} or install "
            "torch-fidelity."
        )
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]), False


class ReferenceClassifier(ModelMixin, ConfigMixin):
    """A small VGG-style CNN classifier trained on the reference dataset, whose penultimate layer stands in for the
    Inception features where those are not available.

    Stages of two 3x3 conv + BatchNorm + ReLU layers, each followed by 2x2 max pooling; global average pooling; a
    `feature_dim` ReLU layer (the features); a linear layer to the class logits.

    Args:
        class_names (`list[str]`): the classes, in label order (e.g. the `ClassLabel` names of CIFAR-10).
        resolution (`int`, defaults to 32): side of the square images it was trained on; other sizes are resized.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 128)`): channels of each stage.
        feature_dim (`int`, defaults to 128): size of the feature vector.
    """

    @register_to_config
    def __init__(
        self,
        class_names: list[str],
        resolution: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
    ):
        super().__init__()
        layers = []
        in_channels = 3
        for channels in block_out_channels:
            for _ in range(2):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
                layers.append(nn.ReLU(inplace=True))
                in_channels = channels
            layers.append(nn.MaxPool2d(2))
        self.convs = nn.Sequential(*layers)
        self.feature_layer = nn.Linear(in_channels, feature_dim)
        self.head = nn.Linear(feature_dim, len(class_names))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[-1, 1]`, as `ImageTransform` gives.

        Returns:
            `torch.Tensor` of shape `(B, feature_dim)`: the penultimate activations.
        """
        resolution = self.config.resolution
        if pixel_values.shape[-2:] != (resolution, resolution):
            pixel_values = F.interpolate(pixel_values, size=(resolution, resolution), mode="bilinear", antialias=True)
        pooled = self.convs(pixel_values).mean(dim=(2, 3))
        return F.relu(self.feature_layer(pooled))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The class logits, `torch.Tensor` of shape `(B, num_classes)`, of images in `[-1, 1]`."""
        return self.head(self.features(pixel_values))


class ClassifierFeatureExtractor(FeatureExtractor):
    """Features (and class predictions) of a [`ReferenceClassifier`].

    Args:
        classifier (`ReferenceClassifier` or `str` or `Path`): the classifier, or the folder it was saved to.
        device (`str` or `torch.device`, defaults to `"cpu"`): where it runs.
    """

    description = CLASSIFIER_DESCRIPTION

    def __init__(self, classifier: "ReferenceClassifier | str | Path", device: str | torch.device = "cpu"):
        if not isinstance(classifier, ReferenceClassifier):
            classifier = ReferenceClassifier.from_pretrained(classifier)
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval()
        # The weights themselves key the cache: retraining gives new reference statistics.
        digest = hashlib.sha256()
        for name, tensor in sorted(classifier.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.extractor_id = f"reference-classifier-{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self.device, torch.float32) * 2 - 1).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices, `torch.Tensor` of shape `(B,)`, of images in `[0, 1]` of shape `(B, 3, H, W)`."""
        return self.classifier(images.to(self.device, torch.float32) * 2 - 1).argmax(dim=1).cpu()


def load_feature_extractor(
    kind: str = "auto",
    inception_weights: str | Path | None = None,
    classifier: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor | None:
    """Pick the feature network.

    Args:
        kind (`str`, defaults to `"auto"`): `"inception"`, `"classifier"`, `"none"`, or `"auto"`: Inception when its
            weights are found (`inception_weights` or the torch hub cache), else the classifier when `classifier` is
            given, else none.
        inception_weights (`str` or `Path`, *optional*): path of the FID Inception weights.
        classifier (`str` or `Path`, *optional*): folder of a saved [`ReferenceClassifier`].
        device (`str` or `torch.device`, defaults to `"cpu"`): where the network runs.

    Returns:
        A [`FeatureExtractor`], or `None` when there is none to use (FID and KID are then skipped).
    """
    kinds = ("auto", "inception", "classifier", "none")
    if kind not in kinds:
        raise ValueError(f"Feature extractor {kind!r} is not supported; choose one of {list(kinds)}.")
    weights = find_inception_weights(inception_weights)
    if kind == "inception" or (kind == "auto" and weights is not None):
        if weights is None:
            raise ValueError(
                f"No Inception weights: pass their path, or put {FID_INCEPTION_WEIGHTS_NAME} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}."
            )
        return InceptionFeatureExtractor(weights, device)
    if kind == "classifier" or (kind == "auto" and classifier is not None):
        if classifier is None:
            raise ValueError("features 'classifier' needs the folder of a trained reference classifier.")
        return ClassifierFeatureExtractor(classifier, device)
    return None


def caption_labels(captions: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """The class named in each caption ("a photo of a cat" -> the index of "cat"): the one class name that occurs in
    it as whole words, ignoring case.

    Raises:
        `ValueError`: for a caption that names no class or several.
    """
    patterns = [re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE) for name in class_names]
    labels = []
    for caption in captions:
        found = [index for index, pattern in enumerate(patterns) if pattern.search(caption)]
        if len(found) != 1:
            named = [class_names[index] for index in found]
            raise ValueError(
                f"Caption {caption!r} names {len(found)} classes {named}; expected exactly one of {list(class_names)}."
            )
        labels.append(found[0])
    return labels


def iter_pixel_batches(
    dataset: Dataset, resolution: int, batch_size: int = 256, image_column: str = "image"
) -> Iterator[torch.Tensor]:
    """Decode a dataset's images in order, centre-cropped and resized to `resolution` by `ImageTransform` (as in
    training), in batches of `torch.Tensor` of shape `(B, 3, resolution, resolution)` with values in `[0, 1]`."""
    transform = ImageTransform(resolution)
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size][image_column]
        yield (torch.stack([transform(image) for image in images]) + 1) / 2


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


def train_reference_classifier(
    dataset: Dataset,
    output_dir: str | Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    resolution: int = 32,
    num_steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    weight_decay: float = 5e-4,
    num_heldout: int = 5000,
    seed: int = 0,
    max_minutes: float | None = None,
    block_out_channels: tuple[int, ...] = (32, 64, 128),
    feature_dim: int = 128,
) -> tuple[ReferenceClassifier, dict]:
    """Train a [`ReferenceClassifier`] on a class-labelled image dataset and measure it on held-out rows.

    AdamW with a cosine learning rate after a 5% warmup, random crops and flips. A seeded permutation splits off
    `num_heldout` rows that it never trains on.

    Args:
        dataset (`datasets.Dataset`): rows with `image_column` and a `ClassLabel` `label_column`.
        output_dir (`str` or `Path`, *optional*): where to `save_pretrained` it (`config.json` and safetensors
            weights) and write `metrics.json`.
        image_column (`str`, defaults to `"image"`), label_column (`str`, defaults to `"label"`): the columns.
        resolution (`int`, defaults to 32): images are centre-cropped and resized to this square.
        num_steps (`int`, defaults to 3000): optimizer steps.
        batch_size (`int`, defaults to 128): images per step.
        learning_rate (`float`, defaults to 2e-3), weight_decay (`float`, defaults to 5e-4): AdamW settings.
        num_heldout (`int`, defaults to 5000): rows held out to measure accuracy; at most half the dataset.
        seed (`int`, defaults to 0): seeds the split, the initialisation, batches and augmentation.
        max_minutes (`float`, *optional*): stop early after this much training time.
        block_out_channels (`tuple[int, ...]`), feature_dim (`int`): the architecture, see [`ReferenceClassifier`].

    Returns:
        `(classifier, metrics)`: the classifier in eval mode, and `heldout_accuracy`, `train_accuracy` (on as many
        training rows as held-out ones), `steps`, `num_train`, `num_heldout`, `seconds`.
    """
    feature = dataset.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"label_column {label_column!r} must be a ClassLabel column; the dataset has {dict(dataset.features)}."
        )
    if not 0 < num_heldout <= len(dataset) // 2:
        raise ValueError(f"num_heldout must be in [1, {len(dataset) // 2}] (half the dataset), got {num_heldout}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    dataset = dataset.select(order)
    pixels = torch.cat(
        [
            _to_uint8(batch)
            for batch in tqdm(
                iter_pixel_batches(dataset, resolution, 1000, image_column),
                total=-(-len(dataset) // 1000),
                desc="decoding images",
            )
        ]
    )
    labels = torch.tensor(dataset[label_column])
    train_pixels, train_labels = pixels[num_heldout:], labels[num_heldout:]
    heldout_pixels, heldout_labels = pixels[:num_heldout], labels[:num_heldout]

    torch.manual_seed(seed)
    classifier = ReferenceClassifier(
        class_names=list(feature.names),
        resolution=resolution,
        block_out_channels=tuple(block_out_channels),
        feature_dim=feature_dim,
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=weight_decay)
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
        index = torch.randint(0, len(train_pixels), (batch_size,), generator=generator)
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
    if output_dir is not None:
        output_dir = Path(output_dir)
        classifier.save_pretrained(output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return classifier, metrics


def main(argv: list[str] | None = None) -> None:
    """`python -m latentddpm.eval.features --train-classifier --data PATH --out DIR`."""
    from ..data.sources import load_image_caption_dataset

    parser = argparse.ArgumentParser(
        prog="python -m latentddpm.eval.features",
        description="Train the reference classifier whose features stand in for Inception-v3 in FID/KID.",
    )
    parser.add_argument("--train-classifier", action="store_true", help="train and save a ReferenceClassifier")
    parser.add_argument("--data", required=True, help="parquet file, folder or Hub dataset with a ClassLabel column")
    parser.add_argument("--out", type=Path, required=True, help="folder to save the classifier to")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--caption-column", default="text", help="checked to exist by the dataset loader")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-heldout", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    args = parser.parse_args(argv)
    if not args.train_classifier:
        parser.error("nothing to do: pass --train-classifier")

    dataset = load_image_caption_dataset(args.data, image_column=args.image_column, caption_column=args.caption_column)
    _, metrics = train_reference_classifier(
        dataset,
        output_dir=args.out,
        image_column=args.image_column,
        label_column=args.label_column,
        resolution=args.resolution,
        num_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_heldout=args.num_heldout,
        seed=args.seed,
        max_minutes=args.max_minutes,
    )
    print(json.dumps(metrics, indent=2))
    print(f"saved the classifier to {args.out}")


if __name__ == "__main__":
    main()
