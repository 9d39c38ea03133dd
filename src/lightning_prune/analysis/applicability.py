"""Applicability of a criterion in a layer (paper 1): can its scores tell the channels apart at all?

[design] Per group and criterion:

- ``cv`` = std(s) / |mean(s)| (population std): how spread the scores are relative to their size. Norm criteria
  on Gaussian-like filters have ``cv ≈ 1/√(2d)``, i.e. tiny, and then pruning by them is close to random.
- ``gap`` = (mean(kept) − mean(pruned)) / |mean(s)| at the pruning target: how much better the kept channels
  score than the pruned ones, relative to the typical score.
- ``margin`` = (min(kept) − max(pruned)) / |mean(s)|: the normalized distance across the threshold itself.
- ``applicable`` = ``cv >= cv_threshold`` (default 0.1).

A mean of zero makes the normalized values undefined (``None``); such a group is reported not applicable.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .similarity import lowest_indices


def applicability(scores: torch.Tensor | np.ndarray, target: float = 0.5, cv_threshold: float = 0.1) -> dict:
    """``{"cv", "gap", "margin", "applicable"}`` of one score vector, pruning ``round(target · n)`` channels."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64).cpu(), dtype=np.float64).ravel()
    n = len(s)
    mean = float(np.mean(s)) if n else 0.0
    scale = abs(mean)
    cv = float(np.std(s)) / scale if scale > 0 else None
    k = min(max(int(math.floor(target * n + 0.5)), 0), n)
    gap = margin = None
    if 0 < k < n and scale > 0:
        pruned_idx = lowest_indices(s, k)
        mask = np.zeros(n, dtype=bool)
        mask[list(pruned_idx)] = True
        pruned, kept = s[mask], s[~mask]
        gap = float((kept.mean() - pruned.mean()) / scale)
        margin = float((kept.min() - pruned.max()) / scale)
    return {
        "cv": cv if cv is None or math.isfinite(cv) else None,
        "gap": gap,
        "margin": margin,
        "applicable": bool(cv is not None and math.isfinite(cv) and cv >= cv_threshold),
    }
