"""FLOPs and parameter counts, measured with fvcore.

fvcore counts one fused multiply-add as one flop (so its "FLOPs" are what many papers call MACs); reductions
reported by lightning-prune are ratios of fvcore counts and therefore unaffected by that convention.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tracing import first_sample, preserved_state


def _flop_count_analysis() -> type:
    """fvcore's ``FlopCountAnalysis``, imported without fvcore's own deprecation noise.

    Importing ``fvcore.nn`` compiles its focal losses with ``torch.jit.script``, which torch deprecates with a
    ``FutureWarning`` printed on every run of every command that counts FLOPs. The warning is about fvcore's code,
    not the user's, and nothing they can change; it is ignored during this one import only (other
    ``torch.jit.script`` calls still warn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


@dataclass(frozen=True)
class ModelCost:
    flops: int
    params: int


def count_flops(model: nn.Module, example_inputs: Any, *, per_module: bool = False) -> int | dict[str, int]:
    """fvcore FLOPs of one sample (the first of ``example_inputs``), counted in eval mode.

    fvcore counts one multiply-add as one flop. The model's train/eval flags, buffers and RNG are restored
    afterwards, so counting can happen in the middle of training. With ``per_module=True`` returns fvcore's
    ``by_module()`` dict (``""`` is the total).
    """
    FlopCountAnalysis = _flop_count_analysis()

    inputs = first_sample(example_inputs)
    if isinstance(inputs, dict):
        raise TypeError("count_flops: fvcore needs positional example_inputs (a tensor or a tuple of tensors)")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return dict(analysis.by_module()) if per_module else int(analysis.total())
    finally:
        fvcore_logger.setLevel(level)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model: nn.Module, example_inputs: Any) -> ModelCost:
    return ModelCost(flops=count_flops(model, example_inputs), params=count_params(model))


class FlopsModel:
    """Predicts fvcore FLOPs for any assignment of group widths, from one fvcore count per module.

    The FLOPs of a convolution, linear or normalization layer are proportional to its output width times its
    input width per group (or to its width alone for normalizations), so scaling each module's measured count
    by its kept fractions is exact for those layers; other ops (pooling, activations, adds) are scaled by the
    output fraction of their own module where known and otherwise kept. Used to plan a FLOPs target without
    trial surgery; the final count is always re-measured with fvcore.
    """

    def __init__(self, graph: "Any", example_inputs: Any):
        per_module = count_flops(graph.model, example_inputs, per_module=True)
        self.total_measured = int(per_module.get("", 0))
        names = dict(graph.model.named_modules())
        leaf_flops = {
            name: int(flops)
            for name, flops in per_module.items()
            if name and name in names and not list(names[name].children())
        }
        self._base = self.total_measured - sum(leaf_flops.values())
        self._sizes = {g.name: g.size for g in graph.groups}
        # For each leaf module: (flops, out-group or None, in-group or None)
        out_group: dict[str, str] = {}
        in_group: dict[str, str] = {}
        for group in graph.groups:
            for member in group.members:
                if member.kind == "out" or member.is_depthwise:
                    out_group[member.module_name] = group.name
                if member.kind == "in" and not member.is_depthwise:
                    in_group[member.module_name] = group.name
        self._terms = [(f, out_group.get(n), in_group.get(n)) for n, f in leaf_flops.items()]

    def predict(self, widths: dict[str, int]) -> float:
        """FLOPs if each group ``name`` had ``widths[name]`` channels (missing groups keep their width)."""
        total = float(self._base)
        for flops, out_name, in_name in self._terms:
            factor = 1.0
            if out_name is not None:
                factor *= widths.get(out_name, self._sizes[out_name]) / self._sizes[out_name]
            if in_name is not None:
                factor *= widths.get(in_name, self._sizes[in_name]) / self._sizes[in_name]
            total += flops * factor
        return total

    def delta_per_channel(self, name: str) -> float:
        """Whole-network FLOPs removed by removing one channel of group ``name`` (paper 2's ΔF_l)."""
        size = self._sizes[name]
        return self.predict({}) - self.predict({name: size - 1})
