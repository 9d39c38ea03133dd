"""Channel groups and physical channel removal, built on Torch-Pruning's DependencyGraph.

Everything else in lightning-prune talks to this module only: criteria read :class:`ChannelGroup` members,
allocation decides indices, and :meth:`DependencyGraph.prune_groups` removes them. Torch-Pruning stays behind
this interface so the engine could be swapped.

A *channel group* is the set of coupled tensors that must lose the same channel indices together: a conv's
filters, the BatchNorm after it, every conv that reads those channels, and, across a residual add or a concat,
every other producer and consumer tied to them. Channels of a group are numbered ``0 .. size-1`` in the order of
the group's root (its first producer in module order); each member maps its own positions onto those numbers.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import contextlib
import copy

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

from ..errors import (
    ArgumentTypeError,
    GraphBuildTimeout,
    PlanMismatchError,
    PruningError,
    UnsupportedModelError,
    check_bool,
    check_callable,
    check_choice,
    check_mapping,
    check_number,
)
from .flops import counting_flops, counts_one_sample, observing_widths, remember_flops
from .mapping import RemovalRules, mapping_problem, ops_crossed, shape_inconsistencies, tied_through_reshape
from .plan import PruningPlan
from .surgery import ModelSnapshot, ParameterLineage, Slicing, index_tensor
from .tracing import (
    EventDeadline,
    all_requiring_grad,
    batch_of_at_least,
    call_model,
    output_shapes,
    preserved_state,
    run_bounded,
)

OUT = "out"
IN = "in"
TRACE_MODES = ("train", "eval")
_CONV = nn.modules.conv._ConvNd
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_INDEX_MAPPING_UPDATERS = (
    "update_concat_index_mapping",
    "update_split_index_mapping",
    "update_reshape_index_mapping",
    "update_unbind_index_mapping",
    "update_expand_index_mapping",
    "update_slice_index_mapping",
)


class _UnmappableOp(Exception):
    pass


class _Unmappable:
    """Index mapping of an op whose channel correspondence is unknown: any group that reaches it fails."""

    def __init__(self, node: Any):
        self.node = node

    def __call__(self, idxs: Any) -> Any:
        raise _UnmappableOp(f"channels cannot be followed through {self.node.module}")


def _make_unmappable(node: Any) -> None:
    for dep in node.dependencies:
        dep.index_mapping[0] = _Unmappable(node)
    for neighbour in list(node.inputs) + list(node.outputs):
        for dep in neighbour.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _Unmappable(node)


def _saved_input_rank(node: Any) -> int:
    """Rank of the tensor a traced view/reshape op received (0 when autograd did not save its shape)."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None) or getattr(node.grad_fn, "_saved_self_sizes", None)
    return len(tuple(sizes or ()))


def _is_transpose_or_permute(node: Any) -> bool:
    return isinstance(node.module, tp.ops._ElementWiseOp) and any(
        kind in node.module._grad_fn for kind in ("Transpose", "Permute")
    )


def _is_channel_shuffle(node: Any) -> bool:
    """A view next to a transpose with a 5-D shape: ``x.view(b, g, c // g, h, w).transpose(1, 2)`` and back.
    Torch-Pruning maps channels straight through it, which would be wrong (the channels are permuted)."""
    if node.type != tp.ops.OPTYPE.RESHAPE:
        return False
    neighbours = list(node.inputs) + list(node.outputs)
    second_neighbours = [m for n in neighbours for m in list(n.inputs) + list(n.outputs)]
    next_to_transpose = any(_is_transpose_or_permute(n) for n in neighbours + second_neighbours)
    if not next_to_transpose:
        return False
    views_5d = _saved_input_rank(node) >= 5 or any(
        _saved_input_rank(n) >= 5 for n in neighbours if n.type == tp.ops.OPTYPE.ELEMENTWISE
    )
    return views_5d


@contextlib.contextmanager
def _modules_called(called: set) -> Iterator[None]:
    """Add every module whose forward runs inside the block to ``called``."""
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: called.add(module))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _index_mapping_updated_once() -> Iterator[None]:
    """Torch-Pruning's ``get_pruning_group`` re-derives the index mapping of every concat/split/reshape node of
    the graph on each call (O(roots x nodes): 15 s of DenseNet-121's 20 s event). While groups are only being
    collected nothing changes the model, so the first derivation holds for every root: the later ones are
    skipped. (Surgery still updates before each group: pruning one group changes the concat offsets.)"""
    original = tp_index_mapping.update_index_mapping
    updated: list[Any] = []

    def once(graph: Any) -> None:
        if graph not in updated:
            original(graph)
            updated.append(graph)

    tp_index_mapping.update_index_mapping = once
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = original


def index_cap(model: nn.Module) -> int:
    """Four times the widest channel axis of any layer: no channel index set that a layer can read is larger.
    Torch-Pruning's reshape mapping multiplies indices by the merged dimensions at every pass through a view;
    around a cycle of views (Swin V2's heads x head-dim reshapes, fed back through the continuous position bias)
    it multiplies them without end (3 -> 96 -> 3,072 -> 98,304 -> 3,145,728 ... until memory runs out)."""
    widths = [1]
    for m in model.modules():
        if isinstance(m, _CONV):
            widths += [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            widths += [m.in_features, m.out_features]
        elif isinstance(m, nn.Embedding):
            widths.append(m.embedding_dim)
        elif isinstance(m, _NORM) and isinstance(getattr(m, "weight", None), torch.Tensor):
            widths.append(m.weight.numel())
    return 4 * max(widths)


@contextlib.contextmanager
def _tolerant_index_mapping(frozen: set, cap: int | None = None) -> Any:
    """Let Torch-Pruning skip ops whose channel index mapping it cannot work out instead of failing the whole
    model (ShuffleNet's channel shuffle is a view/transpose/view that crashes its reshape inference).
    Such op nodes are collected in ``frozen`` and made unmappable: every group that passes through one fails
    to build and is left unpruned, while the rest of the model stays prunable. A reshape mapping that would
    produce more than ``cap`` channel indices (:func:`index_cap`) stops its group the same way."""
    originals = {name: getattr(tp_index_mapping, name) for name in _INDEX_MAPPING_UPDATERS}
    flatten = tp_index_mapping._FlattenIndexMapping.__call__

    def bounded_flatten(mapping: Any, idxs: Any) -> Any:
        if cap is not None and not mapping.reverse and len(idxs) * mapping._stride > cap:
            raise _UnmappableOp(f"channel indices through a reshape would grow to {len(idxs) * mapping._stride}, "
                                f"beyond any layer's width ({cap // 4}): a cycle of views")
        return flatten(mapping, idxs)

    def tolerant(update):
        def run(graph, node):
            if node not in frozen:
                try:
                    return update(graph, node)
                except Exception:
                    frozen.add(node)
            _make_unmappable(node)

        return run

    for name, update in originals.items():
        setattr(tp_index_mapping, name, tolerant(update))
    tp_index_mapping._FlattenIndexMapping.__call__ = bounded_flatten
    try:
        yield
    finally:
        for name, update in originals.items():
            setattr(tp_index_mapping, name, update)
        tp_index_mapping._FlattenIndexMapping.__call__ = flatten


@dataclass(frozen=True, eq=False)
class GroupMember:
    """One coupled module of a group.

    ``kind`` is ``"out"`` when the group's channels are the module's outputs (conv filters, linear rows,
    normalization features) and ``"in"`` when the module reads them (conv input channels, linear columns).
    ``positions[i]`` is an index along the module's channel axis and ``channels[i]`` the group channel it
    belongs to; a Linear after a flatten reads each channel at several positions.
    """

    module_name: str
    module: nn.Module = dataclasses.field(repr=False)
    kind: str
    positions: torch.Tensor = dataclasses.field(repr=False)
    channels: torch.Tensor = dataclasses.field(repr=False)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, _CONV)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, _NORM)

    @property
    def is_depthwise(self) -> bool:
        m = self.module
        return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.out_channels == m.in_channels

    def weight_index(self) -> tuple[torch.Tensor, ...] | None:
        """Advanced index into ``module.weight`` selecting, for each position, its slice of the weight.

        ``module.weight[index]`` has the positions as its first dimension: for ``"out"`` members the filters
        (rows), for ``"in"`` members the weights that read that input position. Zeroing
        ``module.weight[index]`` of every ``"in"`` member disconnects the group's channels from the network.
        """
        m, p = self.module, self.positions
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        if self.is_norm:
            return (p,) if weight.dim() == 1 else None
        if self.is_linear:
            if self.kind == OUT:
                return (p,)
            rows = torch.arange(weight.shape[0]).expand(len(p), -1)
            return (rows, p[:, None].expand_as(rows))
        if self.is_conv:
            transposed = getattr(m, "transposed", False)
            if self.kind == OUT or self.is_depthwise:
                if not transposed:
                    return (p,)
                if m.groups != 1:
                    return None
                rows = torch.arange(weight.shape[0]).expand(len(p), -1)
                return (rows, p[:, None].expand_as(rows))
            if transposed:
                return (p,) if m.groups == 1 else None
            in_per_group = m.in_channels // m.groups
            out_per_group = m.out_channels // m.groups
            base = (p // in_per_group) * out_per_group
            rows = base[:, None] + torch.arange(out_per_group)[None, :]
            return (rows, (p % in_per_group)[:, None].expand_as(rows))
        return None

    def row_norms(self, p: float) -> torch.Tensor | None:
        """``‖rows‖_p`` of :meth:`weight_rows` in float64, without copying the rows out when each position is
        one whole row of the weight (a producer's filters): the norms of all rows are taken, then indexed."""
        index = self.weight_index()
        if index is None:
            return None
        if len(index) != 1:
            return self.weight_rows().to(torch.float64).norm(p=p, dim=1)
        weight = self.module.weight.detach()
        norms = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), ord=p, dim=1, dtype=torch.float64)
        try:
            return norms[index[0]]
        except IndexError as error:
            raise self._outside(weight, error) from error

    def _outside(self, weight: torch.Tensor, error: IndexError) -> UnsupportedModelError:
        """A mis-mapped group must never surface as a bare IndexError."""
        return UnsupportedModelError(
            f"module {self.module_name!r} ({type(self.module).__name__}): the channel index mapping points "
            f"outside its weight {tuple(weight.shape)} ({error}); add it to ignore= to leave it unpruned.")

    def weight_rows(self) -> torch.Tensor | None:
        """The member's weights for each position, flattened: shape ``[len(positions), d]`` (detached)."""
        index = self.weight_index()
        if index is None:
            return None
        weight = self.module.weight.detach()
        try:
            return weight[index].reshape(len(self.positions), -1)
        except IndexError as error:
            raise self._outside(weight, error) from error


class ChannelGroup:
    """A set of coupled channels that are removed together.

    Attributes:
        name: stable, human-readable name: the first producing module in ``model.named_modules()`` order.
        size: current number of channels.
        divisions: channels come in this many equal chunks (grouped convolutions); removal must take the same
            positions from every chunk.
        members: every coupled module with its positions (see :class:`GroupMember`).
        original_size: width before any pruning recorded in the graph's plan.
    """

    def __init__(
        self,
        name: str,
        size: int,
        divisions: int,
        members: Sequence[GroupMember],
        original_size: int,
        root: tuple[nn.Module, Callable],
        probe: Callable[[tuple[nn.Module, Callable]], Any] | None = None,
    ):
        self.name = name
        self.size = size
        self.divisions = divisions
        self.members = tuple(members)
        self.original_size = original_size
        self._root = root
        self._rules: RemovalRules | None = None
        self._probe = probe

    @property
    def rules(self) -> RemovalRules:
        """Tied channels and narrow members (see :mod:`lightning_prune.structure.mapping`), computed once."""
        if self._rules is None:
            if self._probe is None:
                self._rules = RemovalRules(self.members, self.size, self.min_size)
            else:
                with self._probe(self._root) as probe:
                    self._rules = RemovalRules(self.members, self.size, self.min_size, probe, self._root[0])
        return self._rules

    def closure(self, indices: Iterable[int]) -> list[int]:
        """``indices`` plus every channel physically tied to them (removed with them by surgery)."""
        return self.rules.closure(indices)

    @property
    def producers(self) -> list[GroupMember]:
        """Convs/linears whose output channels are this group (their filters are the group's filters)."""
        return [m for m in self.members if m.kind == OUT and (m.is_conv or m.is_linear)]

    @property
    def consumers(self) -> list[GroupMember]:
        """Convs/linears that read the group's channels (excluding depthwise convs, which are producers)."""
        return [m for m in self.members if m.kind == IN and (m.is_conv or m.is_linear) and not m.is_depthwise]

    @property
    def norms(self) -> list[GroupMember]:
        return [m for m in self.members if m.kind == OUT and m.is_norm]

    @property
    def module_names(self) -> list[str]:
        return sorted({m.module_name for m in self.members})

    @property
    def min_size(self) -> int:
        return self.divisions

    def filters(self) -> torch.Tensor:
        """The producers' filters side by side, one row per group channel: shape ``[size, d]``.

        For a coupled group (residual add) this concatenates every producer, which is how redundancy between
        channels is judged for the whole group."""
        blocks = []
        for member in self.producers:
            rows = member.weight_rows()
            if rows is None:
                continue
            block = rows.new_zeros(self.size, rows.shape[1])
            block[member.channels] = rows
            blocks.append(block)
        if not blocks:
            raise ValueError(f"group {self.name!r} has no convolution or linear producer to read filters from")
        return torch.cat(blocks, dim=1)

    def validate_removal(self, indices: Iterable[int], *, param: str = "indices") -> list[int]:
        """Check indices against this group and return what surgery will really remove, sorted: the indices plus
        the channels tied to them (:meth:`closure`). Raise ``ValueError`` naming ``param`` when they are out of
        range, duplicated, leave fewer than ``min_size`` channels, cut any coupled module below its minimum
        width, or break a grouped convolution's symmetry."""
        try:
            values = [int(i) for i in indices]
        except (TypeError, ValueError):
            raise ValueError(f"{param} for group {self.name!r} must be integers in [0, {self.size}).") from None
        bad = [i for i in values if not 0 <= i < self.size]
        if bad:
            raise ValueError(
                f"{param} for group {self.name!r} out of range: {bad[:5]}; accepted values are integers in "
                f"[0, {self.size})."
            )
        unique = sorted(set(values))
        if len(unique) != len(values):
            raise ValueError(f"{param} for group {self.name!r} contains duplicates.")
        if not self.rules.plain:
            unique = self.closure(unique)  # what surgery really removes: check and count that
        if self.size - len(unique) < self.min_size:
            raise ValueError(
                f"{param} would remove {len(unique)} of {self.size} channels of group {self.name!r} (tied channels "
                f"included); at least {self.min_size} must remain."
            )
        shortfalls = self.rules.shortfalls(unique)
        if shortfalls:
            raise ValueError(
                f"{param} for group {self.name!r} would cut coupled modules below their minimum width: "
                f"{'; '.join(shortfalls[:3])}. Remove fewer channels, or others (ChannelGroup.lowest respects this)."
            )
        if self.divisions > 1:
            chunk = self.size // self.divisions
            pattern = sorted({i % chunk for i in unique})
            expected = sorted(p + k * chunk for k in range(self.divisions) for p in pattern)
            if expected != unique:
                raise ValueError(
                    f"{param} for group {self.name!r}: this group feeds a grouped convolution with "
                    f"{self.divisions} groups, so the same positions must be removed from each of its "
                    f"{self.divisions} chunks of {chunk} channels (use ChannelGroup.expand_positions)."
                )
        return unique

    def expand_positions(self, positions: Iterable[int]) -> list[int]:
        """Positions within one chunk → the channel indices of those positions in every chunk."""
        chunk = self.size // self.divisions
        return sorted(int(p) + k * chunk for k in range(self.divisions) for p in positions)

    def lowest(self, scores: torch.Tensor, n_remove: int) -> list[int]:
        """The ``n_remove`` channels with the lowest scores, respecting grouped-conv chunks (ties: lower index
        first, so the choice is deterministic on every rank). ``n_remove`` must be a multiple of ``divisions``.
        In a group with tied channels or a narrow coupled member, at most ``n_remove`` channels, tied ones
        included, such that every coupled module keeps its minimum width."""
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        if scores.numel() != self.size:
            raise ValueError(f"scores for group {self.name!r} have {scores.numel()} values, expected {self.size}")
        if n_remove <= 0:
            return []
        if n_remove % self.divisions:
            raise ValueError(f"n_remove={n_remove} must be a multiple of divisions={self.divisions}")
        per_chunk = scores.view(self.divisions, -1).mean(0)
        order = torch.sort(per_chunk, stable=True).indices.tolist()  # stable: ties keep the lower index first
        if self.rules.plain:
            return self.expand_positions(order[: n_remove // self.divisions])
        # Tied channels count as removed, and no coupled module may be cut below its minimum: fewer channels
        # than asked may come back (the report counts what was really removed).
        return self.rules.greedy((self.expand_positions([p]) for p in order), n_remove)

    def __repr__(self) -> str:
        return (
            f"ChannelGroup(name={self.name!r}, size={self.size}, original_size={self.original_size}, "
            f"divisions={self.divisions}, members={len(self.members)})"
        )


@dataclass
class SurgeryResult:
    """What one call of :meth:`DependencyGraph.prune_groups` did."""

    removed: dict[str, list[int]]
    replacements: dict[nn.Parameter, Slicing]
    seconds: float


@dataclass
class GraphSavepoint:
    """What :meth:`DependencyGraph.savepoint` keeps: references to the model's tensors and attributes and to
    Torch-Pruning's op records (:class:`ModelSnapshot`), the plan and the cached group sizes. Surgery replaces
    tensors and the plan rather than editing them, so restoring the references undoes every surgery since."""

    graph: "DependencyGraph"
    snapshot: ModelSnapshot
    plan: PruningPlan
    sizes_after: Any

    def restore(self) -> None:
        self.snapshot.restore()
        self.graph.plan, self.graph._sizes_after, self.graph._groups = self.plan, self.sizes_after, None


#: keyword options of :class:`DependencyGraph` a caller may pass through (``graph_kwargs=`` of the callback and CLI).
GRAPH_OPTIONS = ("trace_mode", "protect_outputs", "build_timeout", "max_build_memory_mb", "customized_pruners",
                 "forward_fn")


def check_graph_options(param: str, options: Any) -> dict[str, Any]:
    """Type-check ``options`` meant for :class:`DependencyGraph` (names and value types), naming ``param``."""
    options = check_mapping(param, options, keys=GRAPH_OPTIONS)
    if "trace_mode" in options:
        check_choice(f"{param}['trace_mode']", options["trace_mode"], TRACE_MODES)
    if "protect_outputs" in options:
        check_bool(f"{param}['protect_outputs']", options["protect_outputs"])
    for key in ("build_timeout", "max_build_memory_mb"):
        if key in options:
            check_number(f"{param}[{key!r}]", options[key], minimum=0, exclusive_minimum=True, allow_none=True)
    pruners = options.get("customized_pruners")
    if pruners is not None and not isinstance(pruners, Mapping):
        raise ArgumentTypeError(f"{param}['customized_pruners'] must be a dict {{layer type: pruner}}, got "
                                f"{type(pruners).__name__}.")
    if "forward_fn" in options:
        check_callable(f"{param}['forward_fn']", options["forward_fn"])
    return options


class DependencyGraph:
    """Dependency-aware channel groups of a model, and their physical removal.

    Args:
        model: the network; pruned in place.
        example_inputs: a tensor, tuple (positional arguments) or dict (keyword arguments) to trace with.
        ignore: module names (or modules) whose output channels must never be pruned; every group with such a
            module among its producers is left out. A name covers the module and everything inside it.
        trace_mode: ``"train"`` (default): the graph covers every module a train-mode forward runs. An eval-mode
            trace is made first; when it leaves modules with parameters unrun (GoogLeNet/Inception auxiliary
            heads, which run in training only) a train-mode trace follows and its graph is used. BatchNorm
            statistics and the RNG are restored afterwards. ``"eval"``: the eval-mode trace only, like plain
            Torch-Pruning.
        protect_outputs: never prune groups that would change the shape of the model's outputs (the
            classifier); set False only if you mean it.
        build_timeout: seconds allowed for tracing and grouping before :class:`GraphBuildTimeout`; ``None``
            disables the bound.
        max_build_memory_mb: resident-memory growth allowed while building; ``None`` disables the bound.
        plan: the plan of a model that was already pruned, so new removals compose with it.
        customized_pruners: Torch-Pruning pruners for custom layer types (``{LayerType: pruner}``).
        forward_fn: ``forward_fn(model, example_inputs)`` when the model is not called as ``model(x)``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ignore: Iterable[str | nn.Module] = (),
        *,
        trace_mode: str = "train",
        protect_outputs: bool = True,
        build_timeout: float | None = 120.0,
        max_build_memory_mb: float | None = 8192.0,
        plan: PruningPlan | dict | None = None,
        customized_pruners: Mapping[Any, Any] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_choice("trace_mode", trace_mode, TRACE_MODES)
        check_bool("protect_outputs", protect_outputs)
        check_number("build_timeout", build_timeout, minimum=0, exclusive_minimum=True, allow_none=True)
        check_number("max_build_memory_mb", max_build_memory_mb, minimum=0, exclusive_minimum=True, allow_none=True)
        check_callable("forward_fn", forward_fn)
        if customized_pruners is not None and not isinstance(customized_pruners, Mapping):
            raise ArgumentTypeError(f"customized_pruners must be a dict {{layer type: pruner}}, got "
                                    f"{type(customized_pruners).__name__}.")
        self.model = model
        self.example_inputs = example_inputs
        self.trace_mode = trace_mode
        self.protect_outputs = protect_outputs
        self.build_timeout = build_timeout
        self.max_build_memory_mb = max_build_memory_mb
        self.customized_pruners = dict(customized_pruners or {})
        self.forward_fn = forward_fn
        self.plan = PruningPlan.from_dict(plan)
        self._names = {module: name for name, module in model.named_modules()}
        self._index_cap = index_cap(model)
        self._order = {name: i for i, name in enumerate(self._names.values())}
        self.ignored = self._resolve_ignore(ignore)
        #: groups taken out of ``groups`` by :meth:`exclude`, with the reason.
        self.excluded: dict[str, str] = {}
        self.unprunable_widths: dict[str, tuple[int, int]] = {}
        self._tp: tp.DependencyGraph | None = None
        self._frozen_nodes: set = set()
        self._groups: list[ChannelGroup] | None = None
        self._sizes_after: tuple[PruningPlan, dict[str, tuple[int, int]]] | None = None  # see _group_sizes
        self._reference_shapes: list[tuple[int, ...]] | None = None  # set by the first, bounded, build
        # Modules run by the eval-mode trace and by the train-mode trace (when one was needed): when they differ
        # the model has mode-dependent branches (GoogLeNet/Inception auxiliary heads) and the check after surgery
        # runs a train-mode forward too.
        self._eval_modules: set[nn.Module] = set()
        self._train_modules: set[nn.Module] | None = None  # None: no train-mode trace was needed
        self.build_seconds = 0.0
        self._build()
        self._check_plan()

    # -- construction ------------------------------------------------------------------------------------------
    def _check_plan(self) -> None:
        """A plan given for composition must describe this model as it is now: every group it names is a module of
        the model, and every prunable group it names has the width the plan says. Checked before any surgery."""
        if not self.plan.groups:
            return
        current = {g.name: g for g in self.groups}
        problems = []
        for name, record in self.plan.groups.items():
            if name not in self._order:
                problems.append(f"group {name!r} (field 'groups') is not a module of {type(self.model).__name__}")
            elif name in current and current[name].size != record.width:
                problems.append(f"group {name!r}, field 'kept': the plan keeps {record.width} channels but the model "
                                f"has {current[name].size}")
        if problems:
            raise PlanMismatchError(
                "plan does not describe this model's current state (pass the plan of this pruned model, or none "
                f"for an unpruned one); nothing was pruned: {'; '.join(problems[:8])}."
            )

    def _resolve_ignore(self, ignore: Iterable[str | nn.Module]) -> set[nn.Module]:
        if isinstance(ignore, (str, nn.Module)):
            ignore = [ignore]
        modules = dict(self.model.named_modules())
        resolved: set[nn.Module] = set()
        for entry in ignore:
            if isinstance(entry, str):
                if entry not in modules or entry == "":
                    import difflib

                    close = difflib.get_close_matches(entry, [n for n in modules if n], n=3)
                    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                    raise ValueError(
                        f"ignore: {entry!r} is not a module of the model; accepted values are names from "
                        f"model.named_modules() (e.g. {next((n for n in modules if n), '')!r}).{hint}"
                    )
                module = modules[entry]
            elif isinstance(entry, nn.Module):
                if entry not in self._names:
                    raise ValueError(f"ignore: {type(entry).__name__} instance is not a submodule of the model.")
                module = entry
            else:
                raise ValueError(f"ignore entries must be module names or modules, got {entry!r}")
            resolved.update(module.modules())
        return resolved

    def _index_mapping(self) -> Any:
        """Torch-Pruning's index mapping made tolerant of ops it cannot map (collected in ``_frozen_nodes``) and
        bounded by this model's :func:`index_cap`: the context of every trace, grouping, probe and surgery."""
        return _tolerant_index_mapping(self._frozen_nodes, self._index_cap)

    def _forward(self, model: nn.Module, inputs: Any) -> Any:
        return self.forward_fn(model, inputs) if self.forward_fn is not None else call_model(model, inputs)

    def _build(self) -> None:
        start = time.perf_counter()
        run_bounded(
            self._trace,
            what=f"Building the dependency graph of {type(self.model).__name__}",
            timeout_s=self.build_timeout,
            max_memory_mb=self.max_build_memory_mb,
        )
        self.build_seconds = time.perf_counter() - start

    def _trace(self) -> None:
        """Trace in eval mode; with ``trace_mode="train"`` trace again in train mode only when the eval forward left
        modules with parameters unrun (GoogLeNet/Inception auxiliary heads), so the graph covers them too.

        The eval-mode trace is also the reference forward: the output shapes the checks after surgery compare
        with, the modules it runs, the widths :class:`FlopsModel` derives counts from and, when it is exactly
        what fvcore would count, the FLOPs. One forward serves Torch-Pruning and the event (a separate
        reference forward and fvcore's own trace cost two more)."""
        shapes = self._trace_on(self.example_inputs, train=False)
        if self._reference_shapes is None:  # the first build's: later builds of the same graph keep them
            self._reference_shapes = shapes
        self._train_modules = None
        if self.trace_mode == "train" and self._unrun_in_eval():
            self._trace_in_train_mode()
        self.groups  # group now, inside the time bound

    def _unrun_in_eval(self) -> bool:
        return any(module._parameters and module not in self._eval_modules for module in self.model.modules())

    def _trace_in_train_mode(self) -> None:
        # The example batch as given (one image costs Torch-Pruning's memory); only when train-mode BatchNorm
        # rejects a batch of one (a 1x1 feature map) is it repeated to two images.
        self._train_modules = set()
        try:
            self._trace_on(self.example_inputs, train=True)
        except UnsupportedModelError as error:
            doubled = batch_of_at_least(self.example_inputs)
            if doubled is self.example_inputs or "Expected more than 1 value per channel" not in str(error):
                raise
            self._trace_on(doubled, train=True)

    def _trace_on(self, inputs: Any, *, train: bool) -> list[tuple[int, ...]]:
        """Build Torch-Pruning's graph from one forward in the given mode; returns the output shapes."""
        graph = tp.DependencyGraph()
        shapes: list[tuple[int, ...]] = []
        failed: list[BaseException] = []

        count = not train and counts_one_sample(inputs) and self.forward_fn is None

        def forward(model: nn.Module, x: Any) -> Any:
            model.train(train)  # Torch-Pruning calls model.eval() before this
            out: list[Any] = []
            try:
                if count:
                    remember_flops(self, counting_flops(model, lambda: out.append(self._forward(model, x))))
                else:
                    out.append(self._forward(model, x))
            except Exception as error:
                failed.append(error)
                raise
            shapes.extend(output_shapes(out[0]))
            return out[0]

        self._frozen_nodes = set()
        called = self._train_modules if train else self._eval_modules
        with preserved_state(self.model), torch.enable_grad(), all_requiring_grad(self.model), \
                self._index_mapping(), _modules_called(called), \
                (contextlib.nullcontext() if train else observing_widths(self)):
            try:
                graph.build_dependency(self.model, example_inputs=inputs, forward_fn=forward,
                                       customized_pruners=self.customized_pruners or None, verbose=False)
            except Exception as error:
                if failed and error is failed[0] and not train:
                    raise UnsupportedModelError(
                        f"example_inputs: the model's forward failed on them ({type(error).__name__}: {error})."
                    ) from error
                raise UnsupportedModelError(
                    f"Torch-Pruning could not trace {type(self.model).__name__}: {type(error).__name__}: {error}"
                ) from error
        self._frozen_nodes.update(n for n in graph.module2node.values() if _is_channel_shuffle(n))
        for node in self._frozen_nodes:
            _make_unmappable(node)
        self._tp = graph
        self._groups = None
        self.unknown_ops = sorted(
            str(node.grad_fn.name()) if hasattr(node.grad_fn, "name") else str(node.grad_fn)
            for node in graph.module2node.values()
            if isinstance(node.module, tp.ops._ElementWiseOp) and node.module._grad_fn == "Unknown"
        )
        return shapes

    @property
    def frozen_ops(self) -> list[str]:
        """Ops whose channel mapping Torch-Pruning could not infer; groups through them are never pruned."""
        return sorted(str(node.module) for node in self._frozen_nodes)

    # -- groups ------------------------------------------------------------------------------------------------
    @property
    def groups(self) -> list[ChannelGroup]:
        """All prunable channel groups, in module order of their names."""
        if self._groups is None:
            self._groups = self._collect_groups()
        return list(self._groups)

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        import difflib

        names = [g.name for g in self.groups]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"group {name!r} is not a prunable group of this model.{hint} Groups: {names[:8]}...")

    def _collect_groups(self) -> list[ChannelGroup]:
        graph = self._tp
        assert graph is not None
        groups: list[ChannelGroup] = []
        root_types = [_CONV, nn.Linear]
        with self._index_mapping(), _index_mapping_updated_once():
            tp_groups = self._tp_groups(root_types)
        frozen_modules = {node.module for node in self._frozen_nodes}
        for tp_group in tp_groups:
            if self.protect_outputs and self._reaches_output(tp_group):
                continue
            members = self._members(tp_group)
            out_names = [m.module_name for m in members if m.kind == OUT]
            if not out_names:
                continue
            name = min(out_names, key=lambda n: self._order.get(n, len(self._order)))
            size = len(tp_group[0].idxs)
            root_dep = tp_group[0].dep
            if any(item.dep.target.module in frozen_modules for item in tp_group):
                self._record_unprunable(name, self._out_width(root_dep.target.module) or size)  # counts vs target
                continue
            if self._reject_mapping(name, tp_group, members, size):
                continue
            record = self.plan.groups.get(name)
            original = record.original_size if record is not None else size
            groups.append(
                ChannelGroup(
                    name=name,
                    size=size,
                    divisions=self._divisions(tp_group, size),
                    members=members,
                    original_size=original,
                    root=(root_dep.target.module, root_dep.handler),
                    probe=self._probe_removal,
                )
            )
        groups.sort(key=lambda g: self._order.get(g.name, len(self._order)))
        return groups

    @contextlib.contextmanager
    def _probe_removal(self, root: tuple[nn.Module, Callable]) -> Iterator[Callable[[list[int]], list[GroupMember]]]:
        """``probe(channels)``: the members (with positions) Torch-Pruning's surgery would cut for removing
        ``channels`` of the group rooted at ``root``, without cutting anything (the dependency walk only). Inside
        the block nothing changes the model, so the index mapping is derived once for all probes."""
        with self._index_mapping(), _index_mapping_updated_once():
            yield lambda channels: self._members(self._tp.get_pruning_group(root[0], root[1], list(channels)))

    def _reject_mapping(self, name: str, tp_group: Any, members: list[GroupMember], size: int) -> bool:
        """Leave out a group whose index mapping cannot be right (Torch-Pruning 1.6 mis-maps some split/concat
        patterns: res2net, dpn, CSP, mixnet), recording it in :attr:`unmappable` with the module and op named and
        its width in :attr:`unprunable_widths`, so the target report counts it. Pruning it would fail or,
        worse, remove the wrong channels."""
        root = tp_group[0].dep.target.module
        root_width = self._out_width(root) or size
        ops = ops_crossed(tp_group)
        problem = mapping_problem(members, root_width, size, ops) or tied_through_reshape(members, size, ops)
        if problem is None:
            return False
        root_name = self._names.get(root, root)
        self.unmappable[name] = f"UnsupportedModelError: group {name!r} (root {root_name!r}) is left unpruned: {problem}"
        named = next((m.module for m in members if m.module_name == name), root)
        self._record_unprunable(name, self._out_width(named) or root_width)
        return True

    def _out_width(self, module: nn.Module) -> int | None:
        pruner = self._tp.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if pruner is not None else None
        return int(width) if width is not None else None

    def _record_unprunable(self, name: str, width: int) -> None:
        record = self.plan.groups.get(name)
        self.unprunable_widths[name] = (record.original_size if record is not None else width, width)

    def _widest_root(self, tp_group: Any) -> Any:
        """The same group, rooted at its widest producer when Torch-Pruning rooted it at a narrower one (a ghost
        block's depthwise "cheap" conv, whose 8 channels stand for 16 of the residual): channel numbers are then
        positions of the widest tensor, so tied channels show up as such and every channel is counted."""
        graph = self._tp
        width = len(tp_group[0].idxs)
        best, best_width = None, width
        for item in tp_group:
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(module, (_CONV, nn.Linear)):
                continue
            if isinstance(module, _CONV) and module.groups == module.out_channels and module.groups > 1:
                continue
            pruner = graph.get_pruner_of_module(module)
            candidate = pruner.get_out_channels(module) if pruner is not None else None
            if candidate is not None and candidate > best_width and len(set(item.idxs)) == candidate:
                best, best_width = module, candidate
        if best is None:
            return tp_group
        pruner = graph.get_pruner_of_module(best)
        return graph.get_pruning_group(best, pruner.prune_out_channels, list(range(best_width)))

    def _tp_groups(self, root_types: list[type]) -> list:
        """Torch-Pruning's ``get_all_groups``, except that a root whose group cannot be mapped (it crosses an op
        Torch-Pruning cannot follow) is recorded in ``self.unmappable`` and skipped instead of failing."""
        graph = self._tp
        visited: set[nn.Module] = set()
        ignored = set(self.ignored)
        self.unmappable: dict[str, str] = {}
        #: ``(original, current)`` widths of the groups the library had to leave unpruned (unmappable or
        #: excluded), which count against a channel target (:meth:`channel_sparsity`)
        kept = getattr(self, "unprunable_widths", {})
        self.unprunable_widths: dict[str, tuple[int, int]] = {n: w for n, w in kept.items() if n in self.excluded}
        result = []
        for module in list(graph.module2node):
            if module in ignored or module in visited or not isinstance(module, tuple(root_types)):
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                tp_group = graph.get_pruning_group(
                    module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
                )
                tp_group = self._widest_root(tp_group)
            except Exception as error:
                name = self._names.get(module, str(module))
                self.unmappable[name] = f"{type(error).__name__}: {error}"
                self._record_unprunable(name, int(pruner.get_out_channels(module)))
                visited.add(module)
                continue
            prunable = True
            for item in tp_group:
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    visited.add(item.dep.target.module)
                    if item.dep.target.module in ignored:
                        prunable = False
            if prunable:
                result.append(tp_group)
        return result

    def _members(self, tp_group) -> list[GroupMember]:
        graph = self._tp
        members = []
        for item in tp_group:
            module = item.dep.target.module
            name = self._names.get(module)
            if name is None:  # Torch-Pruning's own op nodes (add, cat, reshape) and bare parameters
                continue
            kind = OUT if graph.is_out_channel_pruning_fn(item.dep.handler) else IN
            members.append(
                GroupMember(
                    module_name=name,
                    module=module,
                    kind=kind,
                    positions=index_tensor(item.idxs),
                    channels=index_tensor(item.root_idxs),
                )
            )
        return members

    def _reaches_output(self, tp_group) -> bool:
        graph = self._tp
        for item in tp_group:
            target = item.dep.target
            if isinstance(target.module, tp.ops._OutputOp):
                return True
            if graph.is_out_channel_pruning_fn(item.dep.handler) and not target.outputs:
                return True
        return False

    def _divisions(self, tp_group, size: int) -> int:
        graph = self._tp
        divisions = 1
        for item in tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in self._names:
                continue
            if isinstance(module, _CONV) and module.groups == module.out_channels:
                continue  # depthwise: channels are independent
            pruner = graph.get_pruner_of_module(module)
            if pruner is None:
                continue
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                count = pruner.get_out_channel_groups(module)
            else:
                count = pruner.get_in_channel_groups(module)
            if count and count > 1 and size % count == 0:
                divisions = max(divisions, int(count))
        return divisions

    # -- surgery -----------------------------------------------------------------------------------------------
    def prune(self, group: ChannelGroup | str, indices: Iterable[int]) -> SurgeryResult:
        """Remove ``indices`` (channel numbers of ``group``) from every coupled tensor."""
        return self.prune_groups({group.name if isinstance(group, ChannelGroup) else group: indices})

    def prune_groups(self, removals: Mapping[str | ChannelGroup, Iterable[int]], **event_info: Any) -> SurgeryResult:
        """Remove channels from several groups in one atomic step.

        Every argument is checked before the model is touched. If surgery or the forward check after it fails,
        the model is restored exactly and :class:`PruningError` is raised: a failed prune never leaves a
        half-pruned model. On success the plan records the removal and the groups are refreshed.

        Returns a :class:`SurgeryResult` whose ``replacements`` map each replaced parameter to its successor,
        for :func:`lightning_prune.transplant_optimizer`.
        """
        if not isinstance(removals, Mapping):
            raise TypeError("removals must map group names to channel indices")
        by_name = {g.name: g for g in self.groups}
        checked: dict[str, list[int]] = {}
        for key, indices in removals.items():
            name = key.name if isinstance(key, ChannelGroup) else key
            if name not in by_name:
                try:
                    self.group(name)
                except KeyError as error:  # a bad argument, not a failed lookup: name the parameter
                    raise ValueError(f"removals: {error.args[0]} Accepted values are the names of graph.groups.") \
                        from None
            if isinstance(indices, torch.Tensor):
                indices = indices.flatten().tolist()
            unique = by_name[name].validate_removal(indices)
            if unique:
                checked[name] = unique
        start = time.perf_counter()
        if not checked:
            return SurgeryResult({}, {}, 0.0)
        # The plan after this step, computed before the model is touched: a plan that does not fit fails here.
        new_plan = self.plan.copy()
        for name, indices in checked.items():
            new_plan.record_removal(name, by_name[name].size, indices)
        new_plan.add_event(removed={name: len(ix) for name, ix in checked.items()}, **event_info)

        # Torch-Pruning's op records (concat/split sizes) are restored with the model, so a failed step needs no
        # graph rebuild (one build per failure made exclusion probing cost a build per broken group).
        snapshot = self._model_snapshot()
        lineage = ParameterLineage()
        try:
            with lineage.recording():
                self._cut(checked, by_name)
            replacements = lineage.replacements(self.model)
        except BaseException as error:
            # Any interruption (KeyboardInterrupt, SystemExit included) restores the exact previous model before
            # it propagates: nothing half-pruned can be used or checkpointed afterwards.
            snapshot.restore()
            if not isinstance(error, Exception):
                raise
            raise PruningError(
                f"Pruning failed and the model was restored to its state before this step: "
                f"{type(error).__name__}: {error}"
            ) from error

        self.plan = new_plan
        self._groups = None
        self._sizes_after = (new_plan, {g.name: (g.original_size, g.size - len(checked.get(g.name, ())))
                                        for g in by_name.values()})
        return SurgeryResult(checked, replacements, time.perf_counter() - start)

    @property
    def has_mode_dependent_branches(self) -> bool:
        """Whether the train-mode trace ran other modules than the eval-mode reference forward (auxiliary heads)."""
        return self._train_modules is not None and self._train_modules != self._eval_modules

    def _check_widths(self, expected: Mapping[str, int], by_name: Mapping[str, ChannelGroup]) -> None:
        """The plan and the report count what was really removed: a group whose root lost more (or fewer) channels
        than planned, e.g. through channels tied in a way the mapping did not show, fails the step (and it is
        rolled back) instead of being recorded wrongly."""
        for name, width in expected.items():
            module, _ = by_name[name]._root
            actual = self._out_width(module)
            if actual is not None and actual != width:
                raise RuntimeError(f"group {name!r}: surgery left {actual} channels where {width} were planned "
                                   "(channels tied to the removed ones were not accounted for)")
        touched = {m.module for name in expected for m in by_name[name].members}
        problems = shape_inconsistencies((self._names[m], m) for m in touched if m in self._names)
        if problems:
            raise RuntimeError(f"surgery left inconsistent modules: {'; '.join(sorted(problems)[:3])}")

    def _check_forward(self) -> None:
        """Run the pruned model in eval mode (it must work and keep the output shapes), and in train mode too when
        the model has mode-dependent branches (:attr:`has_mode_dependent_branches`): every module the train-mode
        forward runs is then proven to accept its pruned inputs. (Without such branches the train-mode forward
        runs the same modules on the same channel widths, which the eval forward has just checked.)"""
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            with observing_widths(self):  # lets the event derive its FLOPs after surgery without counting again
                shapes = output_shapes(self._forward(self.model, self.example_inputs))
            if shapes != self._reference_shapes:
                raise RuntimeError(f"output shapes changed from {self._reference_shapes} to {shapes}")
            if self.has_mode_dependent_branches:
                self.model.train()
                self._forward(self.model, batch_of_at_least(self.example_inputs))

    def mask_targets(self, removals: Mapping[str | ChannelGroup, Iterable[int]]) -> list[tuple[torch.Tensor, tuple]]:
        """``(weight, index)`` pairs that :meth:`masked` zeroes: every consumer weight that reads the removed
        channels. Knowing them in advance tells a caller where in the network the change starts to matter."""
        by_name = {g.name: g for g in self.groups}
        targets: list[tuple[torch.Tensor, tuple]] = []
        for key, indices in removals.items():
            group = by_name[key.name if isinstance(key, ChannelGroup) else key]
            chosen = torch.zeros(group.size, dtype=torch.bool)
            # tied channels go with the ones asked for, as in surgery
            chosen[torch.as_tensor(group.closure(indices), dtype=torch.long)] = True
            for member in group.consumers:
                index = member.weight_index()
                if index is None:
                    continue
                selected = chosen[member.channels]
                if not selected.any():
                    continue
                weight = member.module.weight
                targets.append((weight, tuple(ix[selected].to(weight.device) for ix in index)))
        return targets

    @contextlib.contextmanager
    def masked(self, removals: Mapping[str | ChannelGroup, Iterable[int]],
               targets: list[tuple[torch.Tensor, tuple]] | None = None) -> Any:
        """Temporarily disconnect channels instead of removing them: zero every consumer weight that reads them.

        In eval mode this gives exactly the output of the physically pruned model (the equivalence the test
        suite proves on the architecture zoo), without surgery, so trial prunes (sensitivity analysis, the
        blending search) are cheap. Weights are restored on exit. ``targets`` (from :meth:`mask_targets` for the
        same removals) saves deriving them again when one mask is applied many times."""
        saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for weight, sub in (self.mask_targets(removals) if targets is None else targets):
                    saved.append((weight, sub, weight[sub].clone()))
                    weight[sub] = 0.0
            yield self
        finally:
            with torch.no_grad():
                for weight, sub, values in reversed(saved):
                    weight[sub] = values

    # -- reporting ---------------------------------------------------------------------------------------------
    def widths(self) -> dict[str, int]:
        return {name: size for name, (_, size) in self._group_sizes().items()}

    def original_widths(self) -> dict[str, int]:
        return {name: original for name, (original, _) in self._group_sizes().items()}

    def _group_sizes(self) -> dict[str, tuple[int, int]]:
        """``{name: (original_size, size)}`` of every group. Right after a surgery they are the groups before it
        less what it removed (surgery checked every root's width), so a one-shot event reports without walking
        Torch-Pruning's graph a third time; the next access to :attr:`groups` collects them anew. Keyed on the
        plan object, which every surgery replaces and every rollback puts back."""
        if self._groups is None and self._sizes_after is not None and self._sizes_after[0] is self.plan:
            return dict(self._sizes_after[1])
        return {g.name: (g.original_size, g.size) for g in self.groups}

    # -- groups Torch-Pruning maps but whose removal breaks the model -------------------------------------------
    def find_unprunable(self, removals: Mapping[str, Iterable[int]] | Iterable[str] | None = None, *,
                        deadline: EventDeadline | None = None) -> dict[str, str]:
        """Groups whose physical removal breaks the model although Torch-Pruning maps them (e.g. ViT's
        embedding width, which ``forward`` reshapes to a size stored in an attribute).

        ``removals`` maps group names to the channels the event will really remove, and those are what is probed
        (a group may survive losing one channel and break at the real amount); given only names (default: all
        groups), each loses one channel position. Probing works on one deep copy of the model with one graph
        build: the candidates are removed together and, when that fails, bisected (each half probed, the copy
        restored in place after every probe, no rebuild), so ``k`` broken groups among ``n`` cost about
        ``2 k log2 n`` trial surgeries. Returns ``{name: reason}``; the model itself is not touched.
        ``deadline`` (:class:`EventDeadline`) bounds the copy's build and the probing."""
        deadline = deadline if deadline is not None else EventDeadline(None)
        wanted = self._probe_removals(removals)
        if not wanted:
            return {}
        trial = self._trial_copy(deadline)
        broken: dict[str, str] = {}
        trial._bisect_broken(list(wanted), wanted, broken, deadline)
        return broken

    def _probe_removals(self, removals: Mapping[str, Iterable[int]] | Iterable[str] | None) -> dict[str, list[int]]:
        by_name = {g.name: g for g in self.groups}
        if isinstance(removals, Mapping):
            asked = {(k.name if isinstance(k, ChannelGroup) else k): list(v) for k, v in removals.items()}
        else:  # names only: one channel position each (the smallest removal)
            names = list(by_name) if removals is None else list(removals)
            asked = {n: by_name[n].expand_positions([0]) for n in names if n in by_name}
        wanted = {}
        for name, indices in asked.items():
            if name not in by_name:
                continue
            try:  # what surgery will really remove (tied channels included)
                wanted[name] = by_name[name].validate_removal(indices)
            except ValueError:
                continue  # not a removal surgery would attempt
        return {name: indices for name, indices in wanted.items() if indices}

    def _trial_copy(self, deadline: EventDeadline) -> "DependencyGraph":
        ignore_names = sorted({self._names[m] for m in self.ignored if m in self._names} - {""})
        try:
            return DependencyGraph(
                copy.deepcopy(self.model), self.example_inputs, ignore=ignore_names, trace_mode=self.trace_mode,
                protect_outputs=self.protect_outputs, build_timeout=deadline.bound(self.build_timeout),
                max_build_memory_mb=self.max_build_memory_mb, plan=self.plan,
                customized_pruners=self.customized_pruners, forward_fn=self.forward_fn,
            )
        except GraphBuildTimeout as error:
            if deadline.expired():
                raise deadline.error("building the copy of the graph that exclusion probing works on") from error
            raise

    def _bisect_broken(self, names: list[str], wanted: Mapping[str, list[int]], broken: dict[str, str],
                       deadline: EventDeadline) -> None:
        deadline.check(f"probing which of {len(wanted)} group(s) break the model")
        reason = self._trial_surgery({name: wanted[name] for name in names})
        if reason is None:
            return
        if len(names) == 1:
            broken[names[0]] = reason
            return
        middle = len(names) // 2
        for half in (names[:middle], names[middle:]):
            self._bisect_broken(half, wanted, broken, deadline)

    def _operations(self) -> list[nn.Module]:
        """Torch-Pruning's op modules (concat, split, reshape...): outside the model, edited by surgery."""
        return [m for m in self._tp.module2node if isinstance(m, nn.Module) and m not in self._names]

    @contextlib.contextmanager
    def tentatively(self, removals: Mapping[str | ChannelGroup, Iterable[int]]) -> Iterator[nn.Module]:
        """Prune ``removals`` (:meth:`prune_groups`, with its checks; :class:`PruningError` if it fails), yield the
        pruned model, and on exit, whatever happened inside, put back exactly what was there: the model's
        tensors and attributes, Torch-Pruning's op records, the plan and the groups. To measure a candidate before
        committing to it; nothing else (optimizers, other callbacks) sees the tentative model."""
        savepoint = self.savepoint()
        try:
            self.prune_groups(removals)
            yield self.model
        finally:
            savepoint.restore()

    def savepoint(self) -> GraphSavepoint:
        """The model and this graph as they are now; :meth:`GraphSavepoint.restore` puts both back exactly,
        undoing every surgery made since (the optimizers and other holders of parameters are the caller's)."""
        return GraphSavepoint(self, self._model_snapshot(), self.plan, self._sizes_after)

    def _model_snapshot(self) -> ModelSnapshot:
        """The model's tensors and attributes and Torch-Pruning's op records (concat/split sizes), which surgery
        edits too: restoring both makes the graph fit the model again without a rebuild."""
        return ModelSnapshot(self.model, extra_modules=self._operations())

    def _cut(self, removals: Mapping[str, list[int]], by_name: Mapping[str, ChannelGroup]) -> None:
        """Torch-Pruning's surgery of ``removals`` (checked indices per group name) on the model, then the checks
        that every group got its new width and the model still runs; raises where either fails (the caller
        restores its snapshot)."""
        with torch.no_grad(), self._index_mapping():
            for name, indices in removals.items():
                module, handler = by_name[name]._root
                self._tp.get_pruning_group(module, handler, indices).prune()
        self._check_widths({name: by_name[name].size - len(ix) for name, ix in removals.items()}, by_name)
        self._check_forward()

    def _trial_surgery(self, removals: Mapping[str, list[int]]) -> str | None:
        """Remove ``removals`` from this graph's model with the usual checks, then put everything back in place,
        Torch-Pruning's own op records (concat/split sizes) included, so the next probe needs no rebuild. Returns
        why the surgery failed, or None. Only for the throwaway copy of :meth:`find_unprunable`."""
        by_name = {g.name: g for g in self.groups}
        snapshot = self._model_snapshot()
        try:
            self._cut(removals, by_name)
            return None
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        finally:
            snapshot.restore()

    def exclude(self, reasons: Mapping[str, str]) -> None:
        """Take groups out of :attr:`groups` for good (as if their producers were in ``ignore``); ``reasons``
        maps group names to why, kept in :attr:`excluded`."""
        for name, reason in reasons.items():
            group = self.group(name)
            module, _ = group._root
            self.ignored.update(module.modules())
            self.excluded[name] = reason
            self.unprunable_widths[name] = (group.original_size, group.size)
        self._groups = None

    def channel_sparsity(self, include_unprunable: bool = False) -> float:
        """Fraction of the prunable channels (summed over groups) removed so far. With ``include_unprunable``,
        the groups the library had to leave unpruned (:attr:`unprunable_widths`: excluded or unmappable) count
        too, as unremoved channels: that is how a target is judged (groups the user ignored never count)."""
        widths = list(self._group_sizes().values())
        if include_unprunable:
            widths += list(self.unprunable_widths.values())
        original = sum(o for o, _ in widths)
        return 1.0 - sum(c for _, c in widths) / original if original else 0.0

    def __repr__(self) -> str:
        return f"DependencyGraph({type(self.model).__name__}, groups={len(self.groups)}, trace_mode={self.trace_mode!r})"


def apply_plan(
    model: nn.Module,
    plan: PruningPlan | dict,
    example_inputs: Any,
    **graph_kwargs: Any,
) -> DependencyGraph:
    """Rebuild a pruned architecture on a freshly constructed (unpruned) ``model``, in place.

    Afterwards ``model.load_state_dict(pruned_state_dict)`` works. Returns the graph, whose ``plan`` equals
    ``plan``. Raises :class:`PlanMismatchError` when the plan names groups or widths the model does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = PruningPlan.from_dict(plan)  # schema, types and indices: InvalidPlanError before anything is built
    graph_kwargs.pop("ignore", None)
    graph = DependencyGraph(model, example_inputs, **graph_kwargs)
    current = {g.name: g for g in graph.groups}
    removals = {}
    problems = []
    for name, record in plan.groups.items():
        group = current.get(name)
        if group is None:
            problems.append(f"group {name!r} (field 'groups') does not exist in {type(model).__name__}; was the plan "
                            "made for another architecture or configuration?")
            continue
        if group.size != record.original_size:
            problems.append(f"group {name!r}, field 'original_size': the plan was made on {record.original_size} "
                            f"channels but this model has {group.size}; apply_plan needs a freshly constructed, "
                            "unpruned model")
            continue
        kept = set(record.kept)
        removed = [i for i in range(group.size) if i not in kept]
        try:
            group.validate_removal(removed, param="kept")
        except ValueError as error:
            problems.append(f"group {name!r}, field 'kept': {error}")
            continue
        if removed:
            removals[name] = removed
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PlanMismatchError(f"plan does not fit {type(model).__name__} (the model is unchanged): {shown}.")
    graph.prune_groups(removals, source="apply_plan")
    graph.plan.events = [dict(e) for e in plan.events]
    return graph
