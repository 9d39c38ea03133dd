"""Weight initialization shared by the built-in models."""
from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module, *, linear: bool = False) -> None:
    """He (fan-out) initialization of every convolution, BatchNorm to identity, and with ``linear`` also every
    Linear layer (He, zero bias); other Linear layers keep PyTorch's default initialization."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif linear and isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
