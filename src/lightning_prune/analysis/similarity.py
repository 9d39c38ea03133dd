"""Similarity of pruning criteria (paper 1, Huang et al. NeurIPS 2021).

Do two criteria rank a layer's channels the same way, and so prune the same channels? Per group and pair of
criteria: Spearman ρ and Kendall τ of the scores, and the Jaccard overlap of the channel sets each would prune.
For global pruning: the per-group pruning ratios one global threshold yields under each criterion.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

PAIR_SEP = "|"


def pair_key(a: str, b: str) -> str:
    """The key of a criterion pair in reports: ``"l1|l2"``."""
    return f"{a}{PAIR_SEP}{b}"


def criterion_pairs(criteria: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(list(criteria), 2))


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def lowest_indices(scores: np.ndarray, k: int) -> set[int]:
    """The ``k`` lowest-scored indices; ties: lower index first (the order pruning uses)."""
    order = np.lexsort((np.arange(len(scores)), scores))
    return set(int(i) for i in order[:k])


def topk_jaccard(a: np.ndarray, b: np.ndarray, fraction: float = 0.5) -> float:
    """Jaccard overlap of the index sets each score vector would prune at ``fraction`` of the channels
    (``k = max(1, round(fraction · n))`` lowest-scored channels; 1.0 = identical choice)."""
    n = len(a)
    k = min(n, max(1, int(math.floor(fraction * n + 0.5))))
    sa, sb = lowest_indices(a, k), lowest_indices(b, k)
    return len(sa & sb) / len(sa | sb)


def rank_similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, topk_fraction: float = 0.5) -> dict:
    """``{"spearman", "kendall", "topk_jaccard"}`` between two score vectors of the same channels.

    Correlations are ``None`` when undefined (fewer than 2 channels, or a constant score vector)."""
    from scipy import stats

    a = np.asarray(torch.as_tensor(a, dtype=torch.float64).cpu(), dtype=np.float64).ravel()
    b = np.asarray(torch.as_tensor(b, dtype=torch.float64).cpu(), dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"score vectors differ in length: {a.shape[0]} vs {b.shape[0]}")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        rho = tau = float("nan")
    else:
        rho = stats.spearmanr(a, b).statistic
        tau = stats.kendalltau(a, b).statistic
    return {
        "spearman": _finite_or_none(rho),
        "kendall": _finite_or_none(tau),
        "topk_jaccard": float(topk_jaccard(a, b, topk_fraction)) if len(a) else None,
    }


def group_similarity(scores: Mapping[str, Mapping[str, torch.Tensor]], groups: Iterable[str],
                     topk_fraction: float = 0.5) -> dict[str, dict[str, dict]]:
    """``{group: {"a|b": rank_similarity(...)}}`` for every pair of criteria in ``scores``
    (``scores[criterion][group]``)."""
    criteria = list(scores)
    return {
        group: {pair_key(a, b): rank_similarity(scores[a][group], scores[b][group], topk_fraction)
                for a, b in criterion_pairs(criteria)}
        for group in groups
    }


def global_similarity(scores: Mapping[str, Mapping[str, torch.Tensor]], groups: Sequence[str],
                      per_group: Mapping[str, Mapping[str, dict]], topk_fraction: float = 0.5) -> dict[str, dict]:
    """Network-level similarity per pair of criteria.

    ``spearman``/``kendall``/``topk_jaccard``: over the concatenated raw scores of all groups, i.e. how alike
    the two criteria rank channels for one global threshold; ``mean_spearman``/``min_spearman``/
    ``mean_topk_jaccard``: over the per-group values (how alike they are within layers)."""
    criteria = list(scores)
    result = {}
    for a, b in criterion_pairs(criteria):
        key = pair_key(a, b)
        cat_a = torch.cat([torch.as_tensor(scores[a][g], dtype=torch.float64).flatten() for g in groups])
        cat_b = torch.cat([torch.as_tensor(scores[b][g], dtype=torch.float64).flatten() for g in groups])
        entry = rank_similarity(cat_a, cat_b, topk_fraction)
        rhos = [per_group[g][key]["spearman"] for g in groups if per_group[g][key]["spearman"] is not None]
        jac = [per_group[g][key]["topk_jaccard"] for g in groups if per_group[g][key]["topk_jaccard"] is not None]
        entry["mean_spearman"] = float(np.mean(rhos)) if rhos else None
        entry["min_spearman"] = float(np.min(rhos)) if rhos else None
        entry["mean_topk_jaccard"] = float(np.mean(jac)) if jac else None
        result[key] = entry
    return result


def global_ratios(group_objects: Sequence, scores: Mapping[str, Mapping[str, torch.Tensor]], target: float,
                  max_group_sparsity: float = 1.0) -> dict[str, dict[str, float]]:
    """``{criterion: {group: cumulative sparsity}}`` that one global threshold at ``target`` channel sparsity
    yields under each criterion (:func:`lightning_prune.allocation.allocate` with ``allocation="global"``).

    [design] ``max_group_sparsity`` defaults to 1.0 here (only ``min_size`` channels must stay), so the ratios
    show the raw behaviour of the threshold: e.g. L1 vs L2 scales growing differently with the filter size d."""
    from ..allocation import allocate

    result = {}
    for criterion, per_group in scores.items():
        removals = allocate(group_objects, per_group, target, allocation="global",
                            max_group_sparsity=max_group_sparsity)
        result[criterion] = {
            g.name: 1.0 - (g.size - len(removals.get(g.name, ()))) / g.original_size for g in group_objects
        }
    return result
