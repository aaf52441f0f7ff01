"""The reference classifier: a small CNN trained on the reference dataset (`latentddpm train-classifier`) whose
penultimate layer stands in for the Inception features in FID/KID, and whose logits score the class accuracy of
generated images."""

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


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
