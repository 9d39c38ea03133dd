"""FLOPs and parameter counts, fvcore's definition.

fvcore counts one fused multiply-add as one flop (so its "FLOPs" are what many papers call MACs); reductions
reported by lightning-prune are ratios of fvcore counts and therefore unaffected by that convention. The count
applies fvcore's rules during an eager forward (:mod:`.flop_counting`) and runs fvcore's own JIT trace only where
that cannot be exact.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .flop_counting import FvcoreRules
from .tracing import first_sample, preserved_state

log = logging.getLogger(__name__)
#: ``count_flops(backend=...)``: "auto" applies fvcore's rules in an eager forward (fvcore's trace where they cannot
#: be exact); "fvcore" always traces with fvcore.
FLOP_BACKENDS = ("auto", "fvcore")


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


def count_flops(model: nn.Module, example_inputs: Any, *, per_module: bool = False,
                backend: str = "auto") -> int | dict[str, int]:
    """fvcore FLOPs of one sample (the first of ``example_inputs``), counted in eval mode.

    fvcore counts one multiply-add as one flop. The model's train/eval flags, buffers and RNG are restored
    afterwards, so counting can happen in the middle of training. With ``per_module=True`` returns fvcore's
    ``by_module()`` dict (``""`` is the total). ``backend="auto"`` applies fvcore's rules during one eager forward
    and traces with fvcore only when the forward calls something those rules cannot count exactly;
    ``backend="fvcore"`` always traces.
    """
    if backend not in FLOP_BACKENDS:
        raise ValueError(f"backend must be one of {FLOP_BACKENDS}, got {backend!r}")
    inputs = _positional_sample(example_inputs)
    if backend == "auto":
        with preserved_state(model), torch.no_grad():
            model.eval()
            counted = counting_flops(model, lambda: model(*inputs))
        if counted is not None:
            return counted if per_module else counted[""]
    return _fvcore_count(model, inputs, per_module)


def _positional_sample(example_inputs: Any) -> tuple:
    inputs = first_sample(example_inputs)
    if isinstance(inputs, dict):
        raise TypeError("count_flops: fvcore needs positional example_inputs (a tensor or a tuple of tensors)")
    return inputs if isinstance(inputs, tuple) else (inputs,)


def counting_flops(model: nn.Module, forward: Callable[[], Any]) -> dict[str, int] | None:
    """Run ``forward()`` once, applying fvcore's rules to what it computes: fvcore's ``by_module()`` counts for
    that forward, or None when they cannot be reproduced exactly (then count with fvcore). Exceptions of the
    forward propagate."""
    rules = FvcoreRules(model)
    with rules.active():
        forward()
    counted = rules.result()
    if counted is None:
        log.debug("FLOPs of %s are counted with fvcore's trace: %s", type(model).__name__, rules.unverified)
    return counted


def _fvcore_count(model: nn.Module, inputs: tuple, per_module: bool) -> int | dict[str, int]:
    FlopCountAnalysis = _flop_count_analysis()
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


def _shape_key(model: nn.Module, example_inputs: Any) -> tuple:
    """What fvcore's count depends on that surgery can change: every parameter's and buffer's name and shape
    (and which inputs are counted)."""
    # One walk over the modules (named_parameters/named_buffers walk them with a generator per module).
    shapes = []
    for name, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None:
                    shapes.append((name, key, tuple(tensor.shape)))
    return id(example_inputs), tuple(shapes)


def counts_one_sample(example_inputs: Any) -> bool:
    """Whether a forward on ``example_inputs`` computes what :func:`count_flops` counts: positional inputs (a
    tensor or a tuple) whose tensors hold one sample each."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if type(example_inputs) is not tuple:
        return False
    return all(not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 1 for x in example_inputs)


def remember_flops(graph: Any, per_module: dict[str, int] | None) -> None:
    """Keep fvcore's per-module counts of ``graph.model`` as it is now, counted during a forward the graph made
    anyway (:func:`counting_flops`), for the :class:`FlopsModel` of the next event."""
    if per_module is not None:
        graph._flops_count_cache = (_shape_key(graph.model, graph.example_inputs), per_module)


def _cached_per_module_count(graph: Any, example_inputs: Any, key: tuple | None = None) -> dict[str, int]:
    """``count_flops(per_module=True)``, counted once per model state: a second :class:`FlopsModel` of the same
    graph (the allocation strategy's, the event report's) reuses the count until surgery changes a shape."""
    key = key or _shape_key(graph.model, example_inputs)
    cached = getattr(graph, "_flops_count_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    per_module = count_flops(graph.model, example_inputs, per_module=True)
    try:
        graph._flops_count_cache = (key, per_module)
    except AttributeError:  # a graph-like object without attributes: no cache
        pass
    return per_module


#: Leaf modules whose fvcore FLOPs are proportional to their weight's size when only channels change: a
#: convolution or linear layer (output x input-per-group x kernel, times the unchanged spatial size), an affine
#: normalization (one weight per channel, FLOPs per element).
_WEIGHT_PROPORTIONAL = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                        nn.LayerNorm)
#: Parameter-free leaf modules whose fvcore FLOPs are proportional to their input's channel count (per element).
_INPUT_PROPORTIONAL = (nn.AdaptiveAvgPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                       nn.modules.batchnorm._NormBase, nn.InstanceNorm2d)


@contextlib.contextmanager
def observing_widths(graph: Any) -> Iterator[None]:
    """Record, during one eval-mode forward of ``graph.model``, the channel count (``shape[1]``) of every
    parameter-free FLOPs-bearing leaf module's input, for :meth:`FlopsModel.exact_after`. Stored on the graph
    with the shape key of the model it was observed on."""
    model = graph.model
    widths: dict[str, int] = {}
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: tuple) -> None:
        if module in names and isinstance(module, _INPUT_PROPORTIONAL) and args and \
                isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            widths[names[module]] = int(args[0].shape[1])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    graph._observed_widths = (_shape_key(model, graph.example_inputs), widths)


def _observed_widths(graph: Any, example_inputs: Any, key: tuple | None = None) -> dict[str, int] | None:
    """The widths observed by the last eval forward, if it ran on the model as it is now (``key``: its
    :func:`_shape_key`, when the caller has it)."""
    observed = getattr(graph, "_observed_widths", None)
    if observed is None or observed[0] != (key or _shape_key(graph.model, example_inputs)):
        return None
    return observed[1]


def module_groups(graph: "Any") -> tuple[dict[str, str], dict[str, str]]:
    """``(out_group, in_group)``: for each module of ``graph``, the group its output channels belong to (a
    depthwise conv's too: one filter per channel) and the group its input channels read."""
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    for group in graph.groups:
        for member in group.members:
            if member.kind == "out" or member.is_depthwise:
                out_group[member.module_name] = group.name
            if member.kind == "in" and not member.is_depthwise:
                in_group[member.module_name] = group.name
    return out_group, in_group


class FlopsModel:
    """Predicts fvcore FLOPs for any assignment of group widths, from one fvcore count per module.

    The FLOPs of a convolution, linear or normalization layer are proportional to its output width times its
    input width per group (or to its width alone for normalizations), so scaling each module's measured count
    by its kept fractions is exact for those layers; other ops (pooling, activations, adds) are scaled by the
    output fraction of their own module where known and otherwise kept. Used to plan a FLOPs target without
    trial surgery; the final count is always re-measured with fvcore.
    """

    def __init__(self, graph: "Any", example_inputs: Any):
        key = _shape_key(graph.model, example_inputs)
        per_module = _cached_per_module_count(graph, example_inputs, key)
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
        out_group, in_group = module_groups(graph)
        self._terms = [(f, out_group.get(n), in_group.get(n)) for n, f in leaf_flops.items()]
        self._graph, self._example_inputs = graph, example_inputs
        self._scaling = self._scaling_rules(names, leaf_flops, _observed_widths(graph, example_inputs, key))

    @staticmethod
    def _scaling_rules(names: dict[str, nn.Module], leaf_flops: dict[str, int],
                       widths: dict[str, int] | None) -> list[tuple[str, int, str, int]] | None:
        """For every leaf that costs FLOPs, how to scale its count exactly after a channel removal:
        ``(name, flops, "weight" | "input", size now)``; None when some leaf follows no such law."""
        rules = []
        for name, flops in leaf_flops.items():
            if not flops:
                continue
            module = names[name]
            weight = module._parameters.get("weight")
            if isinstance(module, _WEIGHT_PROPORTIONAL) and isinstance(weight, torch.Tensor):
                rules.append((name, flops, "weight", weight.numel()))
            elif isinstance(module, _INPUT_PROPORTIONAL) and widths is not None and name in widths:
                rules.append((name, flops, "input", widths[name]))
            else:
                return None
        return rules

    def exact_after(self) -> int | None:
        """fvcore's count of the model as it is now (after surgery), without counting again, or None when it
        cannot be derived exactly.

        Channel removal changes no spatial size, so each leaf's count scales exactly with its weight's size
        (convolutions, linear layers, affine norms) or its input's channel count (pooling, upsampling,
        parameter-free norms, read from the eval-mode forward check after surgery). The derivation is refused
        (None: count with fvcore) when the model has FLOPs outside leaf modules (functional ops in a ``forward``)
        or in a leaf that follows neither law, or when no forward of the current model was observed."""
        if self._scaling is None or self._base != 0:
            return None
        names = dict(self._graph.model.named_modules())
        widths = None
        total = 0
        for name, flops, law, size in self._scaling:
            module = names.get(name)
            if module is None:
                return None
            if law == "weight":
                weight = module._parameters.get("weight")
                if not isinstance(weight, torch.Tensor):
                    return None
                now = weight.numel()
            else:
                if widths is None:
                    widths = _observed_widths(self._graph, self._example_inputs)
                    if widths is None:
                        return None
                if name not in widths:
                    return None
                now = widths[name]
            if (flops * now) % size:  # not an integer: the law does not hold here
                return None
            total += flops * now // size
        return total

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
