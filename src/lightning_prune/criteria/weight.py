"""Weight-based criteria: they read the group's weights only, no data.

Definitions follow ``shared/papers.md`` (paper 1): the filters of a group are ``F ∈ R^{n×d}``.
"""
from __future__ import annotations

import torch

from ..structure import ChannelGroup
from .base import Criterion, combine_scores, register, scatter_to_channels


class NormCriterion(Criterion):
    """``‖F_i‖_p`` of each producer's filter ``i``, combined over a coupled group's producers."""

    p: float = 2.0

    def score(self, group: ChannelGroup) -> torch.Tensor:
        per_member = []
        for member in group.producers:
            rows = member.weight_rows()
            if rows is None:
                continue
            norms = rows.to(torch.float64).norm(p=self.p, dim=1)
            per_member.append(scatter_to_channels(member, norms, group.size))
        if not per_member:
            raise ValueError(f"{self.name}: group {group.name!r} has no producer with weights")
        return combine_scores(per_member, self.combine)


@register("l1")
class L1(NormCriterion):
    """L1 norm of each filter (Li et al. 2017)."""

    name = "l1"
    p = 1.0


@register("l2")
class L2(NormCriterion):
    """L2 norm of each filter."""

    name = "l2"
    p = 2.0


@register("random")
class Random(Criterion):
    """Seeded random scores: a baseline. The same seed gives the same scores on every process, so DDP ranks
    agree; the generator is derived from ``seed`` and the group name, not from the global RNG."""

    name = "random"

    def __init__(self, seed: int = 0, combine: str = "mean"):
        super().__init__(combine)
        self.seed = int(seed)
        self.calls = 0

    def score(self, group: ChannelGroup) -> torch.Tensor:
        import zlib

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(group.name.encode()) + self.calls)
        return torch.rand(group.size, generator=generator, dtype=torch.float64)
