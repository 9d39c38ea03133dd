"""Pruning criteria: scores per channel, higher = keep. See :mod:`lightning_prune.criteria.base`."""
from .base import Criterion, available, combine_scores, get, register, scatter_to_channels
from .weight import L1, L2, NormCriterion, Random

__all__ = ["Criterion", "L1", "L2", "NormCriterion", "Random", "available", "combine_scores", "get", "register",
           "scatter_to_channels"]
