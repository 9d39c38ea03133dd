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


class OptimizerSnapshot:
    """References to an optimizer's parameter lists and per-parameter state, to put it back exactly as it was
    (cheap: no tensor is copied). A transplant builds new lists and new state entries, never edits the old ones in
    place, so restoring the references undoes it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._params = [list(group["params"]) for group in optimizer.param_groups]
        self._state = dict(optimizer.state)

    def restore(self) -> None:
        for group, params in zip(self.optimizer.param_groups, self._params):
            group["params"] = list(params)
        self.optimizer.state.clear()
        self.optimizer.state.update(self._state)


def transplant_optimizer(optimizer: torch.optim.Optimizer, replacements: Mapping[nn.Parameter, Slicing]) -> int:
    """Point ``optimizer`` at the pruned parameters and slice its state. Returns how many parameters moved.

    ``replacements`` is :attr:`SurgeryResult.replacements` from :meth:`DependencyGraph.prune_groups`. Param
    groups keep their hyper-parameters (different LRs per group stay); LR schedulers hold the optimizer, not the
    parameters, so they continue unchanged. State entries that are not shaped like the parameter (Adam's scalar
    ``step``) are kept as they are.

    Atomic: the new parameter lists and state are computed first and swapped in at the end; if anything fails or
    is interrupted (``KeyboardInterrupt`` included), the optimizer is left exactly as before.
    """
    if not replacements:
        return 0
    snapshot = OptimizerSnapshot(optimizer)
    new_params: list[list[torch.Tensor]] = []
    new_state: dict[torch.Tensor, dict] = {}
    moved_keys = []
    moved = 0
    for group in optimizer.param_groups:
        params = list(group["params"])
        for i, old in enumerate(params):
            slicing = replacements.get(old)
            if slicing is None:
                continue
            new = slicing.new
            params[i] = new
            state = optimizer.state.get(old)
            if state is not None:
                new_state[new] = {
                    key: slicing.apply(value)
                    if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0
                    else value
                    for key, value in state.items()
                }
                moved_keys.append(old)
            moved += 1
        new_params.append(params)
    try:
        _commit(optimizer, new_params, moved_keys, new_state)
    except BaseException:
        snapshot.restore()
        raise
    return moved


def _commit(optimizer: torch.optim.Optimizer, new_params: list[list[torch.Tensor]], moved_keys: list,
            new_state: dict) -> None:
    for group, params in zip(optimizer.param_groups, new_params):
        group["params"] = params
    for old in moved_keys:
        optimizer.state.pop(old, None)
    optimizer.state.update(new_state)
