"""VGG-16 with BatchNorm for CIFAR-sized (32x32) inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .initialization import kaiming_init

__all__ = ["VGG16_CFG", "CifarVGG", "vgg16_bn"]

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class CifarVGG(nn.Module):
    """VGG feature extractor (3x3 conv-BN-ReLU, ``"M"`` = 2x2 max pool) plus a small MLP head.

    The features are followed by ``nn.AdaptiveAvgPool2d(1)`` and ``nn.Flatten()``, so inputs
    other than 32x32 also work (at 32x32 the pool is a no-op on the 1x1 feature map), then
    ``Linear(c, 512) -> ReLU -> Linear(512, num_classes)`` where ``c`` is the last conv width.

    Args:
        cfg: Layer configuration: ints are conv output channels, ``"M"`` is max pooling.
        num_classes: Size of the classifier output.
        in_channels: Number of input image channels.
    """

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """CIFAR VGG-16 with BatchNorm (about 15M parameters).

    Not torchvision's ImageNet ``vgg16_bn`` (which has a 25088-input, 4096-wide head);
    in the model registry this network is called ``vgg16_bn_cifar``.
    """
    return CifarVGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)
