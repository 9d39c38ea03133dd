"""Convolution Weight Distribution Assumption (CWDA) tests (paper 1).

CWDA: the ``n`` filters of a well-trained conv layer, reshaped to ``F ∈ R^{n×d}`` (``d = C_in/groups · k · k``),
are approximately i.i.d. samples of a zero-mean Gaussian with a near-diagonal covariance. Then the filters have
near-equal norms and pairwise distances, which is why norm-based criteria collapse onto each other.

[design] Tests per conv layer, all with p-values (``alpha`` default 0.01):

- ``mean_pvalue``: one-sample t-test of the weights against 0 (``zero_mean`` = not rejected).
- ``offdiag_ratio``: ‖offdiag(S)‖_F / ‖diag(S)‖_F of the **d×d** sample covariance ``S`` of the filters (each
  filter one sample of the d-dimensional distribution CWDA is about; computed through the n×n Gram matrix, so
  wide layers cost nothing extra). Sampling noise alone makes it about ``sqrt((d-1)/(n+1))`` for independent
  coordinates (``offdiag_null``); ``diagonality`` = ratio / null is ≈ 1 for a diagonal covariance and ≫ 1 for
  correlated coordinates.
- ``shapiro_min_pvalue`` / ``shapiro_median_pvalue``: Shapiro–Wilk on ``n_projections`` random 1-D projections
  ``F·u`` (``u`` uniform on the sphere, seeded): each is Gaussian when the filters are.
- ``ks_statistic`` / ``ks_pvalue``: Kolmogorov–Smirnov of the standardized weights against N(0, 1) (the fitted
  normal; conservative, as parameters are estimated).
- ``gaussian`` = not rejected at ``alpha``: ``ks_pvalue >= alpha`` and ``shapiro_min_pvalue · n_projections >=
  alpha`` (Bonferroni over the projections).

The t-test and KS use at most ``max_samples`` weights (a seeded subsample) so their power is comparable between
small and large layers and large layers stay fast. ``qq`` holds the standardized weights' quantiles at the
probabilities ``qq_probabilities`` for QQ plots.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn


def _sample(values: np.ndarray, max_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_samples is not None and values.size > max_samples:
        return rng.choice(values, size=max_samples, replace=False)
    return values


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def cwda_test(
    weight: torch.Tensor,
    *,
    alpha: float = 0.01,
    n_projections: int = 10,
    seed: int = 0,
    max_samples: int | None = 5000,
    qq_points: int = 41,
) -> dict:
    """CWDA statistics of one conv weight (``[n, C_in/groups, k, k]``, or any ``[n, ...]``)."""
    from scipy import stats

    f = weight.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu().numpy()
    n, d = f.shape
    rng = np.random.default_rng(seed)
    flat = f.ravel()
    result: dict = {"n": int(n), "d": int(d), "mean": float(flat.mean()), "std": float(flat.std())}

    sample = _sample(flat, max_samples, rng)
    if sample.size >= 2 and sample.std() > 0:
        result["mean_pvalue"] = _finite(stats.ttest_1samp(sample, 0.0).pvalue)
    else:
        result["mean_pvalue"] = None

    # d×d covariance of the filters, through the n×n Gram matrix of the centered filters.
    if n >= 2:
        centered = f - f.mean(0, keepdims=True)
        gram = centered @ centered.T / (n - 1)
        total_sq = float((gram * gram).sum())  # ‖S‖_F² = ‖X Xᵀ‖_F² / (n-1)²
        diag = (centered * centered).sum(0) / (n - 1)
        diag_sq = float((diag * diag).sum())
        off_sq = max(total_sq - diag_sq, 0.0)
        result["offdiag_ratio"] = math.sqrt(off_sq / diag_sq) if diag_sq > 0 else None
        result["offdiag_null"] = math.sqrt((d - 1) / (n + 1))
        ratio, null = result["offdiag_ratio"], result["offdiag_null"]
        result["diagonality"] = ratio / null if ratio is not None and null > 0 else None
    else:
        result["offdiag_ratio"] = result["offdiag_null"] = result["diagonality"] = None

    p_values = []
    if n >= 3 and n_projections > 0:
        directions = rng.standard_normal((d, n_projections))
        directions /= np.linalg.norm(directions, axis=0, keepdims=True)
        for projection in (f @ directions).T:
            if np.ptp(projection) > 0:
                p_values.append(float(stats.shapiro(projection).pvalue))
    result["shapiro_pvalues"] = p_values
    result["shapiro_min_pvalue"] = min(p_values) if p_values else None
    result["shapiro_median_pvalue"] = float(np.median(p_values)) if p_values else None

    probabilities = np.linspace(0.01, 0.99, qq_points)
    if sample.size >= 2 and sample.std() > 0:
        z = (sample - sample.mean()) / sample.std(ddof=1)
        ks = stats.kstest(z, "norm")
        result["ks_statistic"], result["ks_pvalue"] = _finite(ks.statistic), _finite(ks.pvalue)
        result["qq"] = [float(q) for q in np.quantile(z, probabilities)]
    else:
        result["ks_statistic"] = result["ks_pvalue"] = None
        result["qq"] = []
    result["qq_probabilities"] = [float(p) for p in probabilities]

    ks_ok = result["ks_pvalue"] is not None and result["ks_pvalue"] >= alpha
    shapiro_ok = result["shapiro_min_pvalue"] is None or result["shapiro_min_pvalue"] * len(p_values) >= alpha
    result["gaussian"] = bool(ks_ok and shapiro_ok)
    result["zero_mean"] = bool(result["mean_pvalue"] is None or result["mean_pvalue"] >= alpha)
    return result


def cwda_layers(
    model: nn.Module,
    *,
    alpha: float = 0.01,
    n_projections: int = 10,
    seed: int = 0,
    max_samples: int | None = 5000,
    layers: list[str] | None = None,
) -> dict[str, dict]:
    """:func:`cwda_test` for every convolution of ``model`` (or the named ``layers``), keyed by module name.

    Each layer gets its own deterministic random stream derived from ``seed`` and its name."""
    result = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if layers is not None and name not in layers:
            continue
        layer_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**32
        result[name] = cwda_test(module.weight, alpha=alpha, n_projections=n_projections, seed=layer_seed,
                                 max_samples=max_samples)
    return result
