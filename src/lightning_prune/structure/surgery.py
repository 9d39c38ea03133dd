"""Making surgery atomic and traceable.

`ModelSnapshot` lets a failed pruning step restore the model exactly (no half-pruned model, ever).
`ParameterLineage` records how every parameter was sliced, so optimizer state can be sliced the same way.
Both are cheap: they hold references, never copies of weights, and the lineage keeps only index mappings for
the intermediate tensors of a parameter sliced several times (a convolution loses output, then input channels),
so an event's surgery holds about one pruned copy of the model, not one per slicing step.
"""
from __future__ import annotations

import array
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function


def index_tensor(values: Iterable[int]) -> torch.Tensor:
    """A long tensor of Python ints (Torch-Pruning's index lists), through a C array: half the time of
    ``torch.as_tensor(list)``, which matters for the thousands of index lists of one event."""
    values = list(values)
    try:
        buffer = array.array("q", values)
    except TypeError:  # not plain ints (numpy or tensor scalars)
        return torch.as_tensor(values, dtype=torch.long)
    return torch.frombuffer(buffer, dtype=torch.long) if len(buffer) else torch.empty(0, dtype=torch.long)


class ModelSnapshot:
    """References to every module's parameters, buffers and public attributes (``in_channels``,
    ``num_features``...). Torch-Pruning replaces tensors rather than editing them, so restoring the references
    restores the model."""

    def __init__(self, model: nn.Module, extra_modules: Iterable[nn.Module] = ()):
        self._modules = []
        # extra_modules: modules outside the model whose attributes surgery edits (Torch-Pruning's concat/split
        # op records), so a trial surgery can be undone without rebuilding the graph
        for module in list(model.modules()) + list(extra_modules):
            attributes = {
                key: copy.copy(value) if isinstance(value, (list, dict, set)) else value
                for key, value in vars(module).items()
                if not key.startswith("_")
            }
            self._modules.append((module, dict(module._parameters), dict(module._buffers), attributes))
        self._tensors = [(p, p.data, p.grad) for p in model.parameters()]
        self._tensors += [(b, b.data, None) for b in model.buffers()]

    def restore(self) -> None:
        for module, parameters, buffers, attributes in self._modules:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            for key in [k for k in vars(module) if not k.startswith("_") and k not in attributes]:
                delattr(module, key)
            vars(module).update(attributes)
        for tensor, data, grad in self._tensors:
            tensor.data = data
            if isinstance(tensor, nn.Parameter):
                tensor.grad = grad


@dataclass
class Slicing:
    """How a parameter became its pruned successor: ``index_select(dim, kept)`` applied in order."""

    new: nn.Parameter
    steps: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        for dim, kept in self.steps:
            tensor = tensor.index_select(dim, kept.to(tensor.device))
        return tensor


class ParameterLineage:
    """Records every parameter replacement Torch-Pruning makes while recording is on.

    Only the index mapping of an intermediate tensor is kept: when a tensor the lineage produced is sliced again,
    its entry is handed to its successor and the tensor itself is released (its memory is freed as soon as
    Torch-Pruning drops it). Entries are keyed by ``id``; every tensor whose id is a key is held in ``_alive`` so
    that no id can be reused by a new tensor while it is a key."""

    def __init__(self) -> None:
        self._origin: dict[int, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]] = {}
        self._alive: dict[int, torch.Tensor] = {}  # keeps ids unique while we map them

    @contextlib.contextmanager
    def recording(self) -> Iterator["ParameterLineage"]:
        original = tp_function.BasePruningFunc._prune_parameter_and_grad
        lineage = self

        def recorded(pruner, weight, keep_idxs, pruning_dim):
            new = original(pruner, weight, keep_idxs, pruning_dim)
            # Torch-Pruning builds a fresh nn.Parameter (requires_grad=True): a frozen parameter must stay frozen.
            new.requires_grad_(weight.requires_grad)
            lineage._record(weight, new, keep_idxs, pruning_dim)
            return new

        tp_function.BasePruningFunc._prune_parameter_and_grad = recorded
        try:
            yield self
        finally:
            tp_function.BasePruningFunc._prune_parameter_and_grad = original

    def _record(self, weight: torch.Tensor, new: torch.Tensor, keep_idxs, pruning_dim: int) -> None:
        kept = index_tensor(keep_idxs)
        entry = self._origin.pop(id(weight), None)
        if entry is None:  # an original parameter (the snapshot holds it anyway): it is the root
            root, steps = weight, []
        else:  # an intermediate: pass its mapping on and let the tensor go
            root, steps = entry
            self._alive.pop(id(weight), None)
        self._origin[id(new)] = (root, steps + [(int(pruning_dim), kept)])
        self._alive[id(new)] = new

    def replacements(self, model: nn.Module) -> dict[nn.Parameter, Slicing]:
        """Map each replaced (old) parameter to its successor now in ``model`` and the slicing between them."""
        result: dict[nn.Parameter, Slicing] = {}
        for parameter in model.parameters():
            origin = self._origin.get(id(parameter))
            if origin is not None:
                root, steps = origin
                result[root] = Slicing(parameter, steps)
        return result
