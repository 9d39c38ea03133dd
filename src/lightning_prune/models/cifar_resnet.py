"""CIFAR ResNets (He et al., 2016, Sec. 4.2): ResNet-20/32/56/110.

Three stages of :class:`BasicBlock` with 16/32/64 channels at 32x32/16x16/8x8
resolution, a 3x3 stem convolution with 16 channels, global average pooling and
a linear classifier. A network of depth ``6n + 2`` has ``n`` blocks per stage.

The downsampling shortcut is *option B* (1x1 convolution with stride 2 followed
by BatchNorm) rather than the paper's parameter-free zero-padding (option A).
Zero padding mixes real channels with constant zero channels, which a channel
dependency tracer cannot express as a pruning group; a projection shortcut is a
normal prunable layer. This adds about 2.8K parameters to every depth.
"""

from __future__ import annotations

import torch
from torch import nn

from .initialization import kaiming_init

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2`` layers.

    Args:
        depth: Total number of weighted layers; must satisfy ``(depth - 2) % 6 == 0``.
        num_classes: Size of the classifier output.
        in_channels: Number of input image channels.

    Layer names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer3``,
    ``avgpool``, ``fc``) so tooling that looks for ``fc`` finds the classifier.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self, linear=True)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (``6n + 2``)."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for CIFAR (about 0.27M parameters)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for CIFAR (about 0.47M parameters)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for CIFAR (about 0.86M parameters)."""
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 for CIFAR (about 1.7M parameters)."""
    return CifarResNet(110, num_classes, in_channels)
