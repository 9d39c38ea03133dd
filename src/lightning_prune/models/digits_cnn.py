"""A small CNN for the scikit-learn digits quick start and for tests."""

from __future__ import annotations

import torch
from torch import nn

from .initialization import kaiming_init

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers, a 2x2 adaptive pool and a two-layer MLP head.

    ``features``: conv(in->w) / conv(w->2w) / maxpool / conv(2w->4w), each conv 3x3 followed by
    BN and ReLU; ``pool``: ``AdaptiveAvgPool2d(2)``; ``classifier``: ``Flatten -> Linear(4w*4, 64)
    -> ReLU -> Linear(64, num_classes)``.

    The flatten before the first linear layer is deliberate: every channel of the last conv
    feeds 4 consecutive input features of the linear layer, so pruning one channel must
    remove 4 columns. It exercises channel-to-feature index expansion in the pruning code.

    Args:
        num_classes: Size of the classifier output.
        in_channels: Number of input image channels.
        width: Channel width ``w`` of the first conv layer.

    Works for any input of at least 8x8 pixels (16x16 in the digits quick start).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * 4, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )
        kaiming_init(self)  # BatchNorm is already at identity: only the convolutions change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> DigitsCNN:
    """Build :class:`DigitsCNN` (about 40K parameters at ``width=16``)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)
