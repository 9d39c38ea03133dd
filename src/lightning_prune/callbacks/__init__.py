"""Lightning callbacks: scheduled physical pruning (and criteria analysis)."""
from .prune import PruneCallback, load_pruned

__all__ = ["PruneCallback", "load_pruned"]
