"""Activation-based criteria: they read the feature maps that feed a group's consumers (and, for Taylor, the
loss gradient with respect to them).

Every criterion here keeps only **sum-reducible** statistics per ``(group, site)`` -- sums and counts -- so
scoring streams over any number of batches in bounded memory, and the statistics of several data shards
(DDP ranks) add up to the statistics of their union. A *site* is a consumer module (the activation is the
consumer's input, in the group's channel numbering); each site is scored on its own and the sites of a group are
combined with :func:`~lightning_prune.criteria.base.combine_scores` (``combine``, default ``"mean"``).
"""
from __future__ import annotations

import torch

from ..structure import ChannelGroup
from .base import Criterion, combine_scores, register

_SEP = "|"


def per_channel(activation: torch.Tensor) -> torch.Tensor:
    """``[N, size, *spatial]`` → ``[N, size, M]`` (``M`` = number of spatial positions, 1 without spatial)."""
    n, size = activation.shape[:2]
    return activation.reshape(n, size, -1)


class SiteCriterion(Criterion):
    """Base class of data-driven criteria with per-site statistics.

    Subclasses implement :meth:`update` (turn one batch into statistics with :meth:`add`) and
    :meth:`site_score` (statistics of one site → one score per channel). State keys are
    ``"<group>|<site>|<statistic>"``.
    """

    requires_data = True

    # -- helpers for subclasses ----------------------------------------------------------------------------------
    def add(self, group: ChannelGroup, site: str, stat: str, value: torch.Tensor) -> None:
        self.accumulate(_SEP.join((group.name, site, stat)), value)

    def update(self, group: ChannelGroup, site: str, activation: torch.Tensor, gradient: torch.Tensor | None,
               labels: torch.Tensor | None) -> None:
        raise NotImplementedError

    def site_score(self, group: ChannelGroup, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- protocol ------------------------------------------------------------------------------------------------
    def observe(self, group, site, activation, gradient=None, labels=None) -> None:
        if activation.dim() < 2 or activation.shape[1] != group.size:
            raise ValueError(
                f"criterion {self.name!r}: activation for group {group.name!r} at {site!r} has shape "
                f"{tuple(activation.shape)}; expected [N, {group.size}, *spatial]"
            )
        if self.requires_gradients and gradient is None:
            raise ValueError(f"criterion {self.name!r} needs gradients: observe() got gradient=None")
        if self.requires_labels and labels is None:
            raise ValueError(f"criterion {self.name!r} needs class labels: observe() got labels=None")
        with torch.no_grad():
            self.update(group, site, activation.detach(), None if gradient is None else gradient.detach(), labels)

    def sites(self, group: ChannelGroup) -> dict[str, dict[str, torch.Tensor]]:
        """The statistics observed for ``group``, per site (in the order they were first observed)."""
        prefix = group.name + _SEP
        result: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self._state.items():
            if not key.startswith(prefix):
                continue
            site, _, stat = key[len(prefix):].rpartition(_SEP)
            result.setdefault(site, {})[stat] = value
        return result

    def score(self, group: ChannelGroup) -> torch.Tensor:
        sites = self.sites(group)
        if not sites:
            raise ValueError(
                f"criterion {self.name!r} is data-driven and has no statistics for group {group.name!r}: score it "
                "with lightning_prune.criteria.score_groups(model, groups, criterion, dataloader)."
            )
        per_site = []
        for site, stats in sites.items():
            scores = self.site_score(group, stats)
            if scores.numel() != group.size:
                raise ValueError(
                    f"criterion {self.name!r}: statistics of group {group.name!r} at {site!r} cover "
                    f"{scores.numel()} channels but the group has {group.size}; call reset() after pruning."
                )
            # NaN stays NaN: a non-finite network must not look like one with uninformative channels.
            per_site.append(scores.to(torch.float64))
        return combine_scores(per_site, self.combine)


@register("taylor")
class Taylor(SiteCriterion):
    """First-order Taylor expansion of the loss (Molchanov et al. 2017): per sample and channel
    ``|mean_spatial(a · ∂L/∂a)|``, averaged over samples.

    The gradient is that of the scoring loss with respect to the consumer's input; with the driver's default
    sum-reduced cross-entropy the statistic does not depend on how the data is split into batches. The criterion
    itself does not read labels (``requires_labels`` is False); the default loss does, so the driver asks for them
    unless a ``loss_fn`` that needs none is given.
    """

    name = "taylor"
    requires_gradients = True

    def update(self, group, site, activation, gradient, labels):
        product = per_channel(activation.to(torch.float64) * gradient.to(torch.float64)).mean(2).abs()
        self.add(group, site, "sum", product.sum(0))
        self.add(group, site, "count", torch.tensor(float(product.shape[0]), device=product.device))

    def site_score(self, group, stats):
        return stats["sum"] / stats["count"].clamp_min(1)


@register("apoz")
class APoZ(SiteCriterion):
    """Average Percentage of Zeros (Hu et al. 2016) of the post-ReLU activation: channels that are mostly zero
    matter less. Score = ``1 − APoZ``.

    Args:
        threshold: values with ``|a| <= threshold`` count as zeros (default 0.0: exact zeros, as after ReLU).
    """

    name = "apoz"

    def __init__(self, threshold: float = 0.0, combine: str = "mean"):
        super().__init__(combine)
        self.threshold = float(threshold)

    def update(self, group, site, activation, gradient, labels):
        flat = per_channel(activation)
        zeros = (flat.abs() <= self.threshold).sum((0, 2))
        self.add(group, site, "zeros", zeros)
        self.add(group, site, "count", torch.tensor(float(flat.shape[0] * flat.shape[2]), device=flat.device))

    def site_score(self, group, stats):
        return 1.0 - stats["zeros"] / stats["count"].clamp_min(1)


@register("activation_mean")
class ActivationMean(SiteCriterion):
    """Mean absolute activation of each channel over samples and spatial positions."""

    name = "activation_mean"

    def update(self, group, site, activation, gradient, labels):
        flat = per_channel(activation.to(torch.float64))
        self.add(group, site, "sum", flat.abs().sum((0, 2)))
        self.add(group, site, "count", torch.tensor(float(flat.shape[0] * flat.shape[2]), device=flat.device))

    def site_score(self, group, stats):
        return stats["sum"] / stats["count"].clamp_min(1)


@register("hrank")
class HRank(SiteCriterion):
    """HRank (Lin et al. 2020): average matrix rank of each channel's feature map over samples
    (``torch.linalg.matrix_rank`` of the ``H×W`` map). A map without two spatial dimensions (a flattened
    Linear input) is treated as a ``1×M`` matrix, so its rank is 0 or 1.

    Args:
        chunk: feature maps per ``matrix_rank`` call (bounds the memory of the batched SVD).
    """

    name = "hrank"

    def __init__(self, chunk: int = 4096, combine: str = "mean"):
        super().__init__(combine)
        self.chunk = max(int(chunk), 1)

    def update(self, group, site, activation, gradient, labels):
        n, size = activation.shape[:2]
        if activation.dim() == 4:
            maps = activation
        elif activation.dim() > 4:
            maps = activation.reshape(n, size, -1, activation.shape[-1])
        else:
            maps = activation.reshape(n, size, 1, -1)
        maps = maps.float().reshape(n * size, *maps.shape[2:])
        ranks = torch.cat([torch.linalg.matrix_rank(c) for c in maps.split(self.chunk)]).reshape(n, size)
        self.add(group, site, "sum", ranks.to(torch.float64).sum(0))
        self.add(group, site, "count", torch.tensor(float(n), device=activation.device))

    def site_score(self, group, stats):
        return stats["sum"] / stats["count"].clamp_min(1)
