"""Feature networks for FID/KID: Inception-v3 with the FID weights when they are on disk, else a small classifier that
we train on the reference dataset (`latentddpm.eval.classifier`).

FID is only comparable across papers when computed with the TensorFlow Inception-v3 of Heusel et al. 2017 (the
`pt_inception-2015-12-05-6726825d.pth` port of pytorch-fid and torch-fidelity). That network is used when its weights
are found locally and torch-fidelity or pytorch-fid is installed to build it. Otherwise a small CNN trained on
the reference data (e.g. CIFAR-10) gives the features: its penultimate layer for FID/KID and its logits for the class
accuracy of generated images. Numbers from it are labelled "classifier features (not comparable to published FID)"
everywhere they are shown; they rank models and settings against each other, nothing more.

Train the classifier once with

    latentddpm train-classifier --dataset ../shared/datasets/cifar10/train.parquet --output_dir outputs/classifier
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn

from ..data.transforms import ImageTransform
from .classifier import ReferenceClassifier

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


def iter_pixel_batches(
    dataset: Dataset, resolution: int, batch_size: int = 256, image_column: str = "image"
) -> Iterator[torch.Tensor]:
    """Decode a dataset's images in order, centre-cropped and resized to `resolution` by `ImageTransform` (as in
    training), in batches of `torch.Tensor` of shape `(B, 3, resolution, resolution)` with values in `[0, 1]`."""
    transform = ImageTransform(resolution)
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size][image_column]
        yield (torch.stack([transform(image) for image in images]) + 1) / 2
