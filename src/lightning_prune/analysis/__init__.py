"""Criteria analysis tools (paper 1, "Rethinking the Pruning Criteria for CNNs").

:func:`analyze` measures, on a model's current weights:

- **similarity**: per group and pair of criteria, Spearman ρ, Kendall τ and the overlap of the pruned sets; and
  the per-group ratios one global threshold yields under each criterion;
- **applicability**: per group and criterion, CV = std/mean of the scores and the kept/pruned gap; low CV =
  the criterion cannot tell channels apart there;
- **CWDA**: per conv layer, whether the filters look like i.i.d. Gaussian samples (mean, covariance diagonality,
  Shapiro–Wilk on random projections, Kolmogorov–Smirnov).

It returns an :class:`AnalysisReport` (JSON, PNG figures, TensorBoard, text summary). Command line:
``python -m lightning_prune.analysis --model resnet20 --checkpoint model.ckpt --out analysis/``.
"""
from .applicability import applicability
from .core import DEFAULT_CRITERIA, analyze
from .cwda import cwda_layers, cwda_test
from .report import AnalysisReport
from .similarity import global_ratios, rank_similarity, topk_jaccard

__all__ = ["DEFAULT_CRITERIA", "AnalysisReport", "analyze", "applicability", "cwda_layers", "cwda_test",
           "global_ratios", "rank_similarity", "topk_jaccard"]
