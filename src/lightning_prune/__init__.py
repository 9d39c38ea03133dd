"""lightning-prune: physical, dependency-aware channel pruning while training with PyTorch Lightning.

The public API, by layer (each layer imports only the ones before it):

- structure: :class:`DependencyGraph`, :class:`ChannelGroup`, :func:`apply_plan`, :class:`PruningPlan`,
  :func:`transplant_optimizer`, :func:`count_flops`
- criteria: :mod:`lightning_prune.criteria` (registry by name)
- allocation: :mod:`lightning_prune.allocation`
- one-shot pruning: :func:`prune`
- training: :class:`lightning_prune.callbacks.PruneCallback`, :func:`load_pruned`
"""
from .errors import (
    ArgumentTypeError,
    CheckpointError,
    GraphBuildTimeout,
    InconsistentRanksError,
    InvalidPlanError,
    LightningPruneError,
    NonFiniteScoresError,
    PlanMismatchError,
    PruningError,
    UnsupportedModelError,
)
from .structure import (
    ChannelGroup,
    DependencyGraph,
    FlopsModel,
    GroupMember,
    PruningPlan,
    apply_plan,
    count_flops,
    count_params,
    recalibrate_batchnorm,
    transplant_optimizer,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # The upper layers are imported on first use so that `import lightning_prune` stays light and the
    # structure layer never depends on them.
    if name in ("prune", "PruneReport"):
        from . import pruning

        return getattr(pruning, name)
    if name in ("PruneCallback", "load_pruned"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")


__all__ = [
    "ArgumentTypeError", "CheckpointError", "InvalidPlanError", "NonFiniteScoresError", "ChannelGroup", "DependencyGraph", "FlopsModel", "GraphBuildTimeout", "GroupMember", "InconsistentRanksError",
    "LightningPruneError", "PlanMismatchError", "PruneCallback", "PruneReport", "PruningError", "PruningPlan",
    "UnsupportedModelError", "apply_plan", "count_flops", "count_params", "load_pruned", "prune",
    "recalibrate_batchnorm", "transplant_optimizer", "__version__",
]
