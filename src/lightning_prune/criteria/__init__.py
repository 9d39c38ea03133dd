"""Pruning criteria: scores per channel, higher = keep. See :mod:`lightning_prune.criteria.base`.

Weight criteria: ``l1``, ``l2``, ``fpgm``, ``fermat``, ``bn_scale``, ``random``. Activation criteria: ``taylor``,
``apoz``, ``activation_mean``, ``hrank``. Class discrimination: ``tt``, ``snr``, ``fdr``, ``sd``. Composites:
``blend`` (:class:`Blend`), the ``+variety`` wrapper (:class:`Variety`) and the ``+normalized`` wrapper
(:class:`Normalized`, for global allocation). Data-driven criteria are scored with
:func:`score_groups`.
"""
from .base import Criterion, WrappedCriterion, available, combine_scores, get, register, scatter_to_channels
from .activation import APoZ, ActivationMean, HRank, SiteCriterion, Taylor
from .blend import Blend, BlendSearchResult
from .discrimination import FDR, SNR, ClassDiscrimination, SymmetricDivergence, TTest
from .normalized import Normalized
from .scoring import default_batch_fn, default_loss_fn, score_groups
from .variety import Variety
from .weight import FPGM, L1, L2, BNScale, Fermat, NormCriterion, Random, geometric_median

__all__ = [
    "APoZ", "ActivationMean", "BNScale", "Blend", "BlendSearchResult", "ClassDiscrimination", "Criterion", "FDR",
    "FPGM", "Fermat", "HRank", "L1", "L2", "NormCriterion", "Normalized", "Random", "SNR", "SiteCriterion", "SymmetricDivergence",
    "TTest", "Taylor", "Variety", "WrappedCriterion", "available", "combine_scores", "default_batch_fn", "default_loss_fn",
    "geometric_median", "get", "register", "scatter_to_channels", "score_groups",
]
