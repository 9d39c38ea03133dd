"""FLOPs and parameter counts, measured with fvcore.

fvcore counts one fused multiply-add as one flop (so its "FLOPs" are what many papers call MACs); reductions
reported by lightning-prune are ratios of fvcore counts and therefore unaffected by that convention.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tracing import first_sample, preserved_state


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
    from fvcore.nn import FlopCountAnalysis

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
