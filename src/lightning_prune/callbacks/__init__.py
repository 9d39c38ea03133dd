"""Lightning callbacks: scheduled physical pruning and criteria analysis."""
from .analysis import CriteriaAnalysis
from .prune import PruneCallback, load_pruned

__all__ = ["CriteriaAnalysis", "PruneCallback", "load_pruned"]
