"""``"<criterion>+normalized"``: scores divided by their mean magnitude per group, for global allocation.

One global threshold compares raw scores across groups, and raw scores carry each layer's scale: filter norms
grow with the filter's fan-in d (‖F‖₁ ≈ √(2d/π)·‖F‖₂, paper 1), so L1 with ``allocation="global"`` strips the
small-fan-in layers first (on a digits-trained ResNet-20 it took the stage-1 residual stream from 16 to 2
channels). Normalizing per group makes the threshold compare how a channel stands *within its layer*. Rankings
inside a group are unchanged, so with uniform or sensitivity allocation this wrapper changes nothing.
"""
from __future__ import annotations

import torch

from ..structure import ChannelGroup
from .base import WrappedCriterion, register


@register("normalized", wrapper=True)
class Normalized(WrappedCriterion):
    """Wrap ``base`` so that each group's scores have mean magnitude 1 (``"l1+normalized"``)."""

    suffix = "normalized"

    def transform(self, group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
        scale = scores.abs().mean()
        return scores / scale if scale > 0 else scores
