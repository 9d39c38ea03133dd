"""Keeping an optimizer working across surgery.

After channels are removed, the optimizer still points at the old parameters. ``transplant_optimizer`` swaps
them in place for their pruned successors and slices every per-parameter state tensor (SGD momentum, Adam
``exp_avg``/``exp_avg_sq``) the way the parameter itself was sliced, so training continues as if the removed
channels had never existed: no reset of momentum, no new optimizer, learning rates and schedulers untouched.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .surgery import Slicing


def transplant_optimizer(optimizer: torch.optim.Optimizer, replacements: Mapping[nn.Parameter, Slicing]) -> int:
    """Point ``optimizer`` at the pruned parameters and slice its state. Returns how many parameters moved.

    ``replacements`` is :attr:`SurgeryResult.replacements` from :meth:`DependencyGraph.prune_groups`. Param
    groups keep their hyper-parameters (different LRs per group stay); LR schedulers hold the optimizer, not the
    parameters, so they continue unchanged. State entries that are not shaped like the parameter (Adam's scalar
    ``step``) are kept as they are.
    """
    if not replacements:
        return 0
    moved = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, old in enumerate(params):
            slicing = replacements.get(old)
            if slicing is None:
                continue
            new = slicing.new
            params[i] = new
            state = optimizer.state.pop(old, None)
            if state is not None:
                optimizer.state[new] = {
                    key: slicing.apply(value)
                    if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0
                    else value
                    for key, value in state.items()
                }
            moved += 1
    return moved
