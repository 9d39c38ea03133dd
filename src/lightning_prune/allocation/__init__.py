"""Allocation: how many channels each group loses, and which.

- :func:`allocate` with ``allocation="uniform"`` (every group to the same width fraction) or ``"global"`` (one
  score threshold over the whole network), toward a cumulative channel-sparsity target;
- :class:`SensitivityAllocator`: FLOP-normalized sensitivity analysis (paper 2), toward a FLOPs target.
"""
from .core import ALLOCATIONS, allocate, min_width, round_width
from .sensitivity import SensitivityAllocator, SensitivityResult, SensitivityStep, sensitivity_allocator

__all__ = ["ALLOCATIONS", "SensitivityAllocator", "SensitivityResult", "SensitivityStep", "allocate", "min_width",
           "round_width", "sensitivity_allocator"]
