"""The patch discriminator of stage 1's optional adversarial loss (LDM's autoencoders, after taming-transformers)."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    r"""
    PatchGAN discriminator (Isola et al. 2017, https://arxiv.org/abs/1611.07004): 4x4 convolutions that halve the
    resolution `num_layers` times, then two stride-1 ones, giving a real/fake logit per overlapping image patch.
    GroupNorm rather than BatchNorm, so that it behaves the same on any number of processes and batch sizes.

    Args:
        in_channels (`int`, defaults to 3): image channels.
        channels (`int`, defaults to 64): width of the first layer; doubled per layer up to 8x. Must be divisible by 8.
        num_layers (`int`, defaults to 3): stride-2 layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            next_width = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(8, next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` in [-1, 1] -> patch logits `(B, 1, h, w)`, positive for "real"."""
        return self.layers(images)
