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
            norms = member.row_norms(self.p)
            if norms is None:
                continue
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


def _pairwise_distances(filters: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``filters`` (float64, exact zeros on the diagonal)."""
    f = filters.to(torch.float64)
    squared = (f * f).sum(1)
    gram = f @ f.T
    d2 = (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(0)
    d2.fill_diagonal_(0)
    return d2.sqrt()


def geometric_median(points: torch.Tensor, iterations: int = 200, tol: float = 1e-10,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Geometric median of the rows of ``points`` (``argmin_G Σ_i ‖p_i − G‖₂``) by Weiszfeld's iterations.

    Deterministic: starts from the coordinate-wise mean and stops after ``iterations`` steps or when the
    estimate moves less than ``tol`` (relative to the points' scale). When the estimate lands on a data point,
    the Vardi–Zhang modification keeps the iteration well defined."""
    p = points.detach().to(torch.float64)
    if p.shape[0] == 1:
        return p[0].clone()
    w = torch.ones(p.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    estimate = (w[:, None] * p).sum(0) / w.sum()
    scale = float(p.abs().max()) or 1.0
    for _ in range(max(int(iterations), 1)):
        dist = (p - estimate).norm(dim=1)
        at_point = dist <= 1e-12 * scale
        inv = torch.where(at_point, torch.zeros_like(dist), w / dist.clamp_min(1e-300))
        if float(inv.sum()) == 0.0:
            break
        candidate = (inv[:, None] * p).sum(0) / inv.sum()
        if bool(at_point.any()):
            # Vardi & Zhang (2000): blend with the data point the estimate sits on.
            r = ((inv[:, None] * (p - estimate)).sum(0)).norm()
            eta = float(w[at_point].sum())
            gamma = min(1.0, eta / float(r)) if float(r) > 0 else 1.0
            candidate = (1 - gamma) * candidate + gamma * estimate
        moved = float((candidate - estimate).norm())
        estimate = candidate
        if moved <= tol * scale:
            break
    return estimate


@register("fpgm")
class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019), as defined in paper 1:
    ``s_i = Σ_j ‖F_i − F_j‖₂`` over the group's filters (:meth:`ChannelGroup.filters`: every producer's filter
    side by side, so a residual group is judged on all its coupled convolutions at once). Filters near the
    geometric median are the most replaceable and get the lowest scores."""

    name = "fpgm"

    def score(self, group: ChannelGroup) -> torch.Tensor:
        return _pairwise_distances(group.filters()).sum(1)


@register("fermat")
class Fermat(Criterion):
    """Distance of each filter to the Fermat point (geometric median) ``G`` of the group's filters:
    ``s_i = ‖F_i − G‖₂`` (paper 1). ``G`` is found by Weiszfeld iterations from the mean, which is
    deterministic (no seed needed).

    Args:
        iterations: maximum Weiszfeld iterations (default 200, a [design] choice).
        tol: relative stopping tolerance (default 1e-10).
    """

    name = "fermat"

    def __init__(self, iterations: int = 200, tol: float = 1e-10, combine: str = "mean"):
        super().__init__(combine)
        self.iterations = int(iterations)
        self.tol = float(tol)

    def score(self, group: ChannelGroup) -> torch.Tensor:
        filters = group.filters().to(torch.float64)
        median = geometric_median(filters, self.iterations, self.tol)
        return (filters - median).norm(dim=1)


@register("bn_scale")
class BNScale(Criterion):
    """``|γ_i|`` of the BatchNorm layers of the group (Network Slimming, Liu et al. 2017); the members of a
    coupled group are combined with ``combine``.

    [design] A group without a BatchNorm that has affine weights raises ``ValueError`` naming the group
    rather than silently falling back to another criterion: a ranking by something else under the name
    ``bn_scale`` would be misleading. Opt in to a fallback with ``fallback="l1"`` (any criterion name or
    instance), which then scores such groups, e.g. a hidden Linear layer of the classifier head.

    Args:
        fallback: criterion for groups without an affine BatchNorm; ``None`` (default) raises instead.
    """

    name = "bn_scale"

    def __init__(self, fallback: "Criterion | str | None" = None, combine: str = "mean"):
        super().__init__(combine)
        from .base import get

        self.fallback = None if fallback is None else get(fallback)
        if self.fallback is not None and self.fallback.requires_data:
            raise ValueError("fallback must be a weight criterion (one that needs no data), e.g. 'l1'")

    def score(self, group: ChannelGroup) -> torch.Tensor:
        per_member = []
        for member in group.norms:
            module = member.module
            if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                continue
            weight = getattr(module, "weight", None)
            if not getattr(module, "affine", False) or not isinstance(weight, torch.Tensor):
                continue
            gamma = weight.detach().to(torch.float64)[member.positions.to(weight.device)].abs()
            per_member.append(scatter_to_channels(member, gamma, group.size))
        if not per_member:
            if self.fallback is not None:
                return self.fallback.score(group).to(torch.float64)
            raise ValueError(
                f"criterion 'bn_scale': group {group.name!r} has no BatchNorm layer with affine weights "
                "(|gamma| is undefined there); pass fallback='l1' or use another criterion for this model."
            )
        return combine_scores(per_member, self.combine)
