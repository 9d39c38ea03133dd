"""Filter variety (paper 4: Hubens et al., "Improve CNN Pruning by Maximizing Filter Variety", ICIAP 2022).

A redundancy step appended to any criterion: plain criteria remove rare, discriminative filters and keep
redundant ones; this step focuses removal on redundant filters and protects rare ones.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import check_choice
from ..structure import ChannelGroup
from .activation import per_channel
from .base import Criterion, WrappedCriterion, register

SIMILARITIES = ("weights", "activations")


def abs_cosine_distance(vectors: torch.Tensor) -> np.ndarray:
    """``1 − |cos|`` between the rows of ``vectors`` as a dense ``[n, n]`` array (zero diagonal).

    A zero row (a dead filter) is at distance 0 from other zero rows and 1 from everything else."""
    v = vectors.detach().to(torch.float64).cpu()
    return _distance_from_gram(v @ v.T)


def _distance_from_gram(gram: torch.Tensor) -> np.ndarray:
    gram = gram.detach().to(torch.float64).cpu()
    norms = gram.diagonal().clamp_min(0).sqrt()
    alive = norms > 0
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram)).abs().clamp(0, 1)
    dead = ~alive
    cos[dead[:, None] & dead[None, :]] = 1.0
    distance = (1.0 - cos).numpy()
    np.fill_diagonal(distance, 0.0)
    return (distance + distance.T) / 2


def cluster_labels(distance: np.ndarray, threshold: float | None = None, n_clusters: int | None = None) -> np.ndarray:
    """Average-linkage agglomerative clustering of a distance matrix: cut at distance ``threshold`` or into
    ``n_clusters`` clusters. Returns one integer label per row."""
    from scipy.cluster.hierarchy import cut_tree, fcluster, linkage
    from scipy.spatial.distance import squareform

    n = distance.shape[0]
    if n == 1:
        return np.zeros(1, dtype=int)
    tree = linkage(squareform(distance, checks=False), method="average")
    if n_clusters is not None:  # exactly n_clusters clusters, also when merge heights tie
        return cut_tree(tree, n_clusters=max(1, min(int(n_clusters), n))).reshape(-1)
    return fcluster(tree, t=float(threshold), criterion="distance")


def variety_transform(scores: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Reorder ``scores`` so that the lowest ones are the redundant cluster members.

    In each cluster the best-scored channel (ties: lowest index) is its representative and keeps its score;
    singleton clusters (rare filters) are representatives too. Every other channel is a removal candidate and is
    shifted just below the lowest representative, keeping the base order among candidates. So removing the
    ``n`` lowest removes candidates lowest-base-score first and, once they run out, falls back to the base score
    among the representatives."""
    scores = scores.detach().to(torch.float64)
    values = scores.cpu().numpy()
    protected = np.zeros(len(values), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        best = members[np.lexsort((members, -values[members]))[0]]
        protected[best] = True
    candidates = ~protected
    if not candidates.any():
        return scores.clone()
    top_candidate = values[candidates].max()
    low_protected = values[protected].min()
    if top_candidate < low_protected:
        return scores.clone()
    spread = float(values.max() - values.min())
    gap = (spread or abs(float(low_protected)) or 1.0) * 1e-6
    shifted = values.copy()
    shifted[candidates] = values[candidates] - (top_candidate - low_protected) - gap
    return torch.as_tensor(shifted, dtype=torch.float64, device=scores.device)


class Variety(WrappedCriterion):
    """Wrap ``base`` so that removal focuses on redundant filters (paper 4).

    Per group: similarity of channels ``i, j`` = ``|cos|`` of their filters (:meth:`ChannelGroup.filters`, the
    concatenated producers of a coupled group), or of their feature maps; agglomerative clustering with average
    linkage on ``1 − |cos|``; each cluster's best channel by the base criterion is protected; the others are
    removal candidates, lowest base score first; rare (singleton) filters are protected; when candidates run
    out, the base criterion decides among the rest (see :func:`variety_transform`).

    Args:
        base: the wrapped criterion (instance or name).
        threshold: [design] cut distance on ``1 − |cos|``; default 0.5 (i.e. ``|cos| ≥ 0.5`` on average).
        similarity: [design] ``"weights"`` (default) compares flattened filters; ``"activations"`` compares
            feature maps on the scoring data (accumulates a sum-reducible Gram matrix per site, so it needs
            data).
        n_clusters: instead of ``threshold``, cut into this many clusters: an int, or a float in (0, 1] as a
            fraction of the group's width. With the fraction of channels to keep this is the paper's "as many
            clusters as channels to keep" option.

    The data protocol is forwarded to ``base`` (:class:`WrappedCriterion`), so ``Variety(Taylor())`` scores like
    Taylor does.
    """

    suffix = "variety"

    def __init__(self, base: Criterion | str, threshold: float = 0.5, similarity: str = "weights",
                 n_clusters: int | float | None = None):
        super().__init__(base)
        check_choice("similarity", similarity, SIMILARITIES)
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a distance on 1 - |cos|), got {threshold!r}")
        if n_clusters is not None:
            if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, float)) or n_clusters <= 0 or (
                isinstance(n_clusters, float) and n_clusters > 1
            ):
                raise ValueError(f"n_clusters must be a positive int or a fraction in (0, 1], got {n_clusters!r}")
        self.threshold = float(threshold)
        self.similarity = similarity
        self.n_clusters = n_clusters
        self._gram: dict[str, torch.Tensor] = {}

    # -- data protocol: the base's, plus feature-map Gram matrices for similarity="activations" ----------------
    @property
    def requires_data(self) -> bool:  # type: ignore[override]
        return bool(self.base.requires_data) or self.similarity == "activations"

    def reset(self) -> None:
        super().reset()
        self._gram = {}

    def observe(self, group, site, activation, gradient=None, labels=None) -> None:
        if self.base.requires_data:
            super().observe(group, site, activation, gradient=gradient, labels=labels)
        if self.similarity == "activations":
            flat = per_channel(activation.detach().to(torch.float64))  # [N, size, M]
            gram = torch.einsum("nim,njm->ij", flat, flat)
            key = f"variety|{group.name}"
            self._gram[key] = gram if key not in self._gram else self._gram[key] + gram

    def state(self) -> dict[str, torch.Tensor]:
        state = dict(super().state())
        state.update(self._gram)
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._gram = {k: v for k, v in state.items() if k.startswith("variety|")}
        super().load_state({k: v for k, v in state.items() if not k.startswith("variety|")})

    # -- scoring --------------------------------------------------------------------------------------------------
    def labels(self, group: ChannelGroup) -> np.ndarray:
        """Cluster label of each channel of ``group``."""
        if self.similarity == "activations":
            gram = self._gram.get(f"variety|{group.name}")
            if gram is None:
                raise ValueError(
                    f"criterion {self.name!r} with similarity='activations' has no feature maps for group "
                    f"{group.name!r}: score it with score_groups(..., dataloader)."
                )
            distance = _distance_from_gram(gram)
        else:
            distance = abs_cosine_distance(group.filters())
        n_clusters = self.n_clusters
        if isinstance(n_clusters, float):
            n_clusters = max(1, int(round(n_clusters * group.size)))
        return cluster_labels(distance, self.threshold, n_clusters)

    def transform(self, group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
        if group.size <= 1:
            return scores
        return variety_transform(scores, self.labels(group))

    def __repr__(self) -> str:
        return f"Variety({self.base!r}, threshold={self.threshold}, similarity={self.similarity!r})"


register("variety", wrapper=True)(Variety)
