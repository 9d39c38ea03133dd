"""Allocation: how many channels each group loses, and which.

- :func:`allocate` with ``allocation="uniform"`` (every group to the same width fraction) or ``"global"`` (one
  score threshold over the whole network), toward a cumulative channel-sparsity target;
- :class:`SensitivityAllocator`: FLOP-normalized sensitivity analysis (paper 2), toward a FLOPs target;
- :mod:`.strategies`: the strategies a pruning event runs, behind one interface (:class:`AllocationStrategy`);
- :mod:`.latency`: allocation to a measured-latency budget over a latency lookup table;
- :mod:`.evaluation`: counted, shardable, early-exiting trial evaluation and the DDP :class:`Collective`.
"""
from .core import ALLOCATIONS, allocate, min_width, round_width
from .evaluation import LOCAL, AccuracyEvaluator, Collective
from .latency import LatencyAllocation, LatencyTarget
from .sensitivity import SensitivityAllocator, SensitivityResult, SensitivityStep, sensitivity_allocator
from .strategies import (
    STRATEGIES,
    AllocationContext,
    AllocationStrategy,
    CostEstimate,
    SensitivityAllocation,
    ThresholdAllocation,
    estimate_cost,
    get_strategy,
    register_strategy,
)

__all__ = ["ALLOCATIONS", "LOCAL", "STRATEGIES", "AccuracyEvaluator", "AllocationContext", "AllocationStrategy",
           "Collective", "CostEstimate", "LatencyAllocation", "LatencyTarget", "SensitivityAllocation", "SensitivityAllocator", "SensitivityResult",
           "SensitivityStep", "ThresholdAllocation", "allocate", "estimate_cost", "get_strategy", "min_width",
           "register_strategy", "round_width", "sensitivity_allocator"]
