"""One pruning event, and the one-shot functional API built on it.

``prune_event`` scores every group, decides how many channels each loses (allocation) so that a channel or FLOPs
target is reached, and removes them in one atomic surgery. The :class:`~lightning_prune.callbacks.PruneCallback`
calls it at scheduled epochs; :func:`prune` calls it once on a plain model.
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import criteria as criteria_module
from .allocation import ALLOCATIONS, sensitivity_allocator
from .allocation.evaluation import LOCAL, AccuracyEvaluator, Collective
from .allocation.strategies import (  # noqa: F401  (choose_removals, _trim: importable from here as before)
    AllocationContext,
    _trim,
    choose_removals,
    get_strategy,
    max_sparsity as _max_sparsity,
)
from .allocation.latency import LatencyTarget, check_latency_arguments, resolve_target
from .errors import (
    ArgumentTypeError,
    EventTimeoutError,
    GraphBuildTimeout,
    PruningError,
    check_callable,
    check_choice,
    check_fraction,
    check_mapping,
    check_number,
    check_positive_int,
)
from .structure import (
    DependencyGraph,
    EventDeadline,
    FlopsModel,
    PruningPlan,
    SurgeryResult,
    check_graph_options,
    count_flops,
    count_params,
    recalibrate_batchnorm,
    run_bounded,
)
from .target_report import check_target

SCOPE_ALIASES = {"layerwise": "uniform", "local": "uniform", "uniform": "uniform", "global": "global",
                 "sensitivity": "sensitivity"}


def resolve_allocation(allocation: str | None, scope: str | None = None) -> str:
    """``allocation`` is the one knob; ``scope`` ("layerwise"/"global") is accepted as its older name."""
    if allocation is not None and scope is not None and SCOPE_ALIASES.get(scope) != allocation:
        raise ValueError(f"allocation={allocation!r} and scope={scope!r} disagree; pass only allocation.")
    value = allocation if allocation is not None else (scope if scope is not None else "uniform")
    check_choice("allocation", value, list(ALLOCATIONS) + ["layerwise"])
    return SCOPE_ALIASES[value]


@dataclass
class PruneReport:
    """What a pruning event did. Plain data (``asdict`` gives a JSON-serializable dict)."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    original_widths: dict[str, int]
    removed: dict[str, int]
    seconds: float
    target: float
    target_kind: str
    target_met: bool
    plan: dict[str, Any] = field(repr=False, default_factory=dict)
    original_flops: int | None = None
    #: with ``allocation="sensitivity"``, one entry per round: the baseline and per-group trial accuracies, the
    #: chosen groups and the channels they lost.
    sensitivity_steps: list[dict[str, Any]] = field(repr=False, default_factory=list)
    #: latency target (``latency_reduction``): measured ms at the event's start and end, the table's prediction
    #: for the end, the dense model's ms and the cumulative measured ratio vs the dense model
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    predicted_latency_ms: float | None = None
    dense_latency_ms: float | None = None
    latency_ratio: float | None = None
    #: ``{group: [original, current]}`` widths of the groups the library had to leave unpruned (excluded because
    #: their removal breaks the model, or unmappable); they count in :attr:`channel_sparsity` as unremoved
    unprunable_widths: dict[str, list[int]] = field(default_factory=dict)
    #: latency target: one entry per plan/correction step of the event (budget, predicted and measured ms, the
    #: measured cumulative ratio, the goal, the timed rounds)
    latency_steps: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def latency_reduction(self) -> float | None:
        """Measured latency removed relative to the dense model (latency targets only)."""
        return None if self.latency_ratio is None else 1.0 - self.latency_ratio

    @property
    def latency_error(self) -> float | None:
        """The latency table's relative error at this event's end: predicted / measured - 1."""
        if self.predicted_latency_ms is None or not self.latency_after_ms:
            return None
        return self.predicted_latency_ms / self.latency_after_ms - 1.0

    @property
    def flops_reduction(self) -> float:
        """FLOPs removed relative to the original model (or to this event's start if unknown)."""
        base = self.original_flops or self.flops_before
        return 1.0 - self.flops_after / base if base else 0.0

    @property
    def channel_sparsity(self) -> float:
        """Fraction of the channels removed, counting the groups left unpruned (:attr:`unprunable_widths`)."""
        original = sum(self.original_widths.values()) + sum(o for o, _ in self.unprunable_widths.values())
        current = sum(self.widths_after.values()) + sum(c for _, c in self.unprunable_widths.values())
        return 1.0 - current / original if original else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flops_reduction"] = self.flops_reduction
        data["channel_sparsity"] = self.channel_sparsity
        data["latency_reduction"] = self.latency_reduction
        data["latency_error"] = self.latency_error
        return data

    def summary(self) -> str:
        def human(n: float) -> str:
            for unit in ("", "K", "M", "G", "T"):
                if abs(n) < 1000:
                    return f"{n:.2f}{unit}" if unit else f"{n:.0f}"
                n /= 1000
            return f"{n:.2f}P"

        lines = [
            f"FLOPs   {human(self.flops_before):>9} -> {human(self.flops_after):>9}  "
            f"({self.flops_reduction:.1%} removed vs original)",
            f"Params  {human(self.params_before):>9} -> {human(self.params_after):>9}  "
            f"({1 - self.params_after / max(self.params_before, 1):.1%} removed this event)",
            f"Channels {self.channel_sparsity:.1%} of channels removed (groups left unpruned count); "
            f"{sum(self.removed.values())} this event in {self.seconds:.2f} s",
        ]
        if self.latency_ratio is not None:
            lines.append(f"Latency {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms measured "
                         f"({self.latency_reduction:.1%} removed vs dense {self.dense_latency_ms:.2f} ms; table "
                         f"predicted {self.predicted_latency_ms:.2f} ms, error {self.latency_error:+.1%})")
        if not self.target_met:
            lines.append(f"WARNING: the {self.target_kind} target {self.target:.1%} could not be met")
        return "\n".join(lines)


def prune_event(
    graph: DependencyGraph,
    criterion: criteria_module.Criterion,
    target: float,
    *,
    target_kind: str = "channels",
    allocation: str = "uniform",
    round_to: int | None = None,
    max_group_sparsity: float = 0.9,
    dataloader: Iterable | None = None,
    scoring_batches: int | None = None,
    batch_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    reduce_state: Callable | None = None,
    original_flops: int | None = None,
    evaluate: Callable[[], float] | None = None,
    sensitivity: dict[str, Any] | None = None,
    on_surgery: Callable[[SurgeryResult], None] | None = None,
    before_surgery: Callable[[dict[str, list[int]]], None] | None = None,
    measure: bool = True,
    recalibration_data: Iterable | None = None,
    recalibrate_batches: int = 0,
    world_size: int = 1,
    collective: Collective = LOCAL,
    latency: Any = None,
    event_timeout: float | EventDeadline | None = None,
    **event_info: Any,
) -> PruneReport:
    """Score, allocate and remove channels until ``target`` is reached. See :func:`prune` for the arguments.

    A pipeline: measure the model, build the :class:`~lightning_prune.allocation.AllocationContext`, let the
    allocation strategy (``allocation``: uniform, global, sensitivity) decide and apply removals, re-estimate
    BatchNorm if asked, measure again and report.

    ``before_surgery(removals)`` may veto a surgery by raising (DDP checks that every rank agrees);
    ``on_surgery`` is called after every successful surgery (an optimizer transplant);
    ``measure=False`` skips the fvcore counts (then the report's FLOPs are predictions).
    ``recalibration_data`` (training batches) feeds BatchNorm re-estimation: in sensitivity trials when the
    allocator's ``recalibrate_batches`` > 0, and after the last surgery when ``recalibrate_batches`` > 0; under
    DDP the statistics are averaged over ``world_size`` ranks with ``reduce_state``. ``collective`` shards
    sensitivity trials and Blend's search over the DDP ranks. ``target_kind="latency"`` needs ``latency`` (an
    :class:`~lightning_prune.allocation.LatencyTarget`) and runs the latency allocation whatever ``allocation``.
    ``event_timeout`` (seconds, or an :class:`~lightning_prune.structure.EventDeadline` already running) bounds
    exclusion probing and surgery together; past it :class:`~lightning_prune.errors.EventTimeoutError` is raised
    and the model is restored to its state before the event."""
    start = time.perf_counter()
    deadline = event_timeout if isinstance(event_timeout, EventDeadline) else EventDeadline(
        check_number("event_timeout", event_timeout, minimum=0, exclusive_minimum=True, allow_none=True))
    model, example_inputs = graph.model, graph.example_inputs
    widths_before, params_before = graph.widths(), count_params(model)
    # The event's one fvcore count (reused by the allocation strategy's FlopsModel through the graph's count cache);
    # flops_after is derived exactly from it when the model allows (FlopsModel.exact_after), else counted.
    dense = FlopsModel(graph, example_inputs)
    flops_before = dense.total_measured
    if original_flops is None:
        original_flops = flops_before
    removed: dict[str, int] = {}
    recalibrator = _recalibrator(model, recalibration_data, batch_fn, reduce_state, world_size)
    ctx = AllocationContext(
        graph=graph, criterion=criterion, target=target, target_kind=target_kind, round_to=round_to,
        max_group_sparsity=max_group_sparsity, original_flops=original_flops,
        score=_scorer(graph, criterion, dataloader, scoring_batches, batch_fn, loss_fn, reduce_state),
        apply=_surgeon(graph, removed, before_surgery, on_surgery, event_info, deadline),
        exclude=lambda removals: exclude_breaking_groups(graph, removals, deadline), evaluate=evaluate,
        collective=collective, recalibrator=recalibrator, sensitivity=dict(sensitivity or {}), latency=latency,
        flops_model=dense,
    )
    strategy = get_strategy("latency" if target_kind == "latency" else allocation)
    strategy.check(ctx)
    _warn_left_out(graph)
    _run_within(deadline, graph, removed, lambda: strategy.run(ctx))  # target_met is judged below, on the model
    if recalibrate_batches and removed:
        recalibrator(recalibrate_batches)()
    flops_after = _flops_after(graph, dense, removed, measure)
    met = check_target(graph, target, target_kind, flops_after, original_flops, max_group_sparsity, round_to,
                       stop_reason=ctx.stop_reason, latency_ratio=latency.ratio if latency is not None else None)
    latency_fields = {} if latency is None or target_kind != "latency" else dict(
        latency_before_ms=latency.before_ms, latency_after_ms=latency.after_ms,
        predicted_latency_ms=latency.predicted_ms, dense_latency_ms=latency.dense_ms, latency_ratio=latency.ratio,
        latency_steps=list(latency.records))
    return PruneReport(
        flops_before=flops_before, flops_after=flops_after, params_before=params_before,
        params_after=count_params(model), widths_before=widths_before, widths_after=graph.widths(),
        original_widths=graph.original_widths(), removed=removed, seconds=time.perf_counter() - start,
        target=target, target_kind=target_kind, target_met=met, plan=graph.plan.to_dict(),
        original_flops=original_flops, sensitivity_steps=ctx.records,
        unprunable_widths={n: list(w) for n, w in graph.unprunable_widths.items()}, **latency_fields,
    )


def _flops_after(graph: DependencyGraph, dense: FlopsModel, removed: dict[str, int], measure: bool) -> int:
    """fvcore FLOPs of the model after the event: the dense count when nothing was removed, else derived exactly
    from it (:meth:`FlopsModel.exact_after`, proven against fvcore in tests/test_event_cost.py) or, where it
    cannot be derived, counted again (``measure=False``: the FlopsModel prediction instead)."""
    if not removed:
        return dense.total_measured
    exact = dense.exact_after()
    if exact is not None:
        return exact
    if measure:
        return count_flops(graph.model, graph.example_inputs)
    return int(FlopsModel(graph, graph.example_inputs).predict({}))


def _scorer(graph: DependencyGraph, criterion: Any, dataloader: Iterable | None, scoring_batches: int | None,
            batch_fn: Callable | None, loss_fn: Callable | None, reduce_state: Callable | None) -> Callable:
    from .criteria.scoring import score_groups

    def score() -> dict[str, torch.Tensor]:
        return score_groups(graph.model, graph.groups, criterion, dataloader, scoring_batches=scoring_batches,
                            batch_fn=batch_fn, loss_fn=loss_fn, reduce_state=reduce_state)

    return score


def _warn_left_out(graph: DependencyGraph) -> None:
    """Name the groups left unpruned because Torch-Pruning's split/concat mapping is wrong for them (see
    :mod:`lightning_prune.structure.mapping`): the rest of the model is pruned, and the target counts them."""
    left_out = {name: reason for name, reason in graph.unmappable.items()
                if reason.startswith("UnsupportedModelError")}
    if left_out:
        shown = "; ".join(reason.split(": ", 1)[1] for reason in list(left_out.values())[:3])
        more = f" (and {len(left_out) - 3} more)" if len(left_out) > 3 else ""
        warnings.warn(f"{len(left_out)} channel group(s) are left unpruned because their channel mapping cannot be "
                      f"followed: {shown}{more}. The rest of the model is pruned; add their modules to ignore= to "
                      "silence this.", stacklevel=3)


def _run_within(deadline: EventDeadline, graph: DependencyGraph, removed: dict[str, int],
                run: Callable[[], Any]) -> None:
    """Run the allocation; when ``event_timeout`` stops it after some surgeries of this event, put the model and
    the graph back as they were at the event's start (a timed-out event changes nothing)."""
    if deadline.seconds is None:  # nothing can stop it midway: surgery itself is atomic
        run()
        return
    savepoint = graph.savepoint()
    try:
        run()
    except EventTimeoutError:
        if removed:
            savepoint.restore()  # the model, Torch-Pruning's op records and the plan: the graph fits the model again
            removed.clear()
        raise


def _surgeon(graph: DependencyGraph, removed: dict[str, int], before_surgery: Callable | None,
             on_surgery: Callable | None, event_info: dict[str, Any],
             deadline: EventDeadline | None = None) -> Callable[[dict[str, list[int]]], None]:
    """``apply(removals)``: verify (DDP), prune atomically (within the event's deadline), count, transplant.
    ``removed`` counts what surgery really removed: tied channels included, the widths checked after surgery."""
    deadline = deadline if deadline is not None else EventDeadline(None)

    def apply(removals: dict[str, list[int]]) -> None:
        if not removals:
            return
        if before_surgery is not None:
            before_surgery(removals)
        deadline.check("starting surgery")
        try:  # a surgery stopped by the deadline is rolled back by prune_groups before this sees it
            result = run_bounded(lambda: graph.prune_groups(removals, **event_info), what="Surgery",
                                 timeout_s=deadline.bound(None))
        except GraphBuildTimeout as error:
            raise deadline.error("removing channels (surgery)") from error
        for name, indices in result.removed.items():
            removed[name] = removed.get(name, 0) + len(indices)
        if on_surgery is not None:
            on_surgery(result)

    return apply


def _recalibrator(model: nn.Module, recalibration_data: Iterable | None, batch_fn: Callable | None,
                  reduce_state: Callable | None, world_size: int) -> Callable[[int], Callable[[], int]]:
    """``recalibrator(num_batches)`` -> a callable re-estimating BatchNorm statistics on training batches."""

    def recalibrator(num_batches: int) -> Callable[[], int]:
        if recalibration_data is None:
            raise ValueError("BatchNorm recalibration needs training batches: pass dataloader= (one-shot prune) or "
                             "train with a train dataloader (callback).")
        from .criteria.scoring import default_batch_fn

        def inputs(batch: Any) -> Any:
            return (batch_fn or default_batch_fn)(batch)[0]

        # Read the batches once: trials re-estimate the statistics many times, and a DataLoader would start its
        # workers (and shuffle anew) at every pass.
        cached: list[Any] = []

        def run() -> int:
            if not cached:
                cached.extend(itertools.islice(iter(recalibration_data), num_batches))
            return recalibrate_batchnorm(model, cached, inputs_fn=inputs, reduce=reduce_state, world_size=world_size)

        return run

    return recalibrator


def exclude_breaking_groups(graph: DependencyGraph, removals: dict[str, list[int]],
                            deadline: EventDeadline | None = None) -> bool:
    """After a failed surgery: find the groups among ``removals`` whose removal (at the amounts asked) breaks the
    model, take them out of ``graph`` with a warning naming them and why, and return True; False when no single
    group is to blame (then the failure stands). Probing is bounded by ``deadline``."""
    broken = graph.find_unprunable(removals, deadline=deadline)
    if not broken:
        return False
    graph.exclude(broken)
    details = "; ".join(f"{name}: {reason}" for name, reason in broken.items())
    warnings.warn(f"{len(broken)} channel group(s) cannot be pruned and are left at full width: {details}. "
                  "The rest of the model is pruned (add them to ignore= to skip this check).", stacklevel=3)
    return True


def prune(
    model: nn.Module,
    example_inputs: Any,
    criterion: str | criteria_module.Criterion = "l2",
    amount: float | None = None,
    *,
    flops_reduction: float | None = None,
    latency_reduction: float | None = None,
    latency_input: Any = None,
    latency_dtype: Any = None,
    latency_cache: str | None = None,
    allocation: str | None = None,
    scope: str | None = None,
    ignore: Iterable[str | nn.Module] = (),
    round_to: int | str | None = None,
    max_group_sparsity: float = 0.9,
    dataloader: Iterable | None = None,
    scoring_batches: int | None = None,
    batch_fn: Callable | None = None,
    val_dataloader: Iterable | None = None,
    sensitivity: dict[str, Any] | None = None,
    recalibrate_batches: int = 0,
    plan: PruningPlan | dict | None = None,
    event_timeout: float | None = None,
    **graph_kwargs: Any,
) -> PruneReport:
    """Prune ``model`` in place, once, and report what changed.

    Args:
        model: any ``nn.Module``; pruned in place (physically: parameter shapes shrink).
        example_inputs: a batch to trace with (tensor, tuple of positional inputs, or dict of keyword inputs).
        criterion: a name from :func:`lightning_prune.criteria.available` (``"l1"``, ``"l2"``, ``"fpgm"``,
            ``"taylor"``, ``"sd"``, ``"l1+variety"``...) or a :class:`~lightning_prune.criteria.Criterion`.
        amount: fraction of the prunable channels (summed over groups, counted on the original widths) to have
            removed, in [0, 1); 0.5 when neither ``amount`` nor ``flops_reduction`` is given (giving both is an
            error).
        flops_reduction: fraction of fvcore FLOPs to remove instead, in (0, 1), e.g. 0.443.
        latency_reduction: fraction of *measured* latency to remove instead, in (0, 1): the pruned model's
            latency on ``latency_input`` (eval, ``inference_mode``, median of rounds, on the input's device) is
            at most ``(1 - latency_reduction)`` of the dense model's (within 5 % timing tolerance). Allocated over a
            per-layer latency lookup table (:mod:`lightning_prune.allocation.latency`), then measured and
            calibrated. Exactly one of ``amount``, ``flops_reduction``, ``latency_reduction``.
        latency_input: the inference batch to time (default: ``example_inputs``).
        latency_dtype: time under autocast to this dtype on CUDA (``torch.bfloat16``, ``"bf16"``...).
        latency_cache: directory of the latency-table cache (default ``~/.cache/lightning-prune/latency``).
        allocation: how many channels each group loses: ``"uniform"`` (the same fraction everywhere; alias
            ``"layerwise"``), ``"global"`` (one score threshold across groups) or ``"sensitivity"`` (paper 2's
            FLOP-normalized sensitivity analysis; needs ``val_dataloader``). ``scope`` is an accepted older name.
        ignore: module names (or modules) whose output channels are never pruned.
        round_to: keep widths multiples of this (e.g. 8) where possible; ``"auto"`` (latency targets): per group,
            the step the latency table's measured kernels favour (16, 8, 4 or 1), else 8 (16 for half/bf16 on CUDA).
        max_group_sparsity: no group loses more than this fraction of its original width.
        dataloader: batches for data-driven criteria (``(x, y)`` tuples by default; see ``batch_fn``).
        scoring_batches: how many batches of ``dataloader`` data-driven criteria see (default: all).
        batch_fn: ``batch_fn(batch) -> (inputs, labels)`` when batches are not ``(x, y)``.
        val_dataloader: held-out batches for ``allocation="sensitivity"`` (never the test set).
        sensitivity: keyword arguments of :class:`~lightning_prune.allocation.SensitivityAllocator`
            (``min_width_fraction`` is raised to ``1 - max_group_sparsity`` when that is stricter). The report's
            ``sensitivity_steps`` hold what every round measured. ``{"recalibrate_batches": n}`` re-estimates
            BatchNorm statistics on ``n`` batches of ``dataloader`` before every trial.
        recalibrate_batches: after pruning, re-estimate BatchNorm statistics on this many batches of
            ``dataloader`` (default 0: keep the stale ones; the weights are never changed).
        plan: the plan of an already pruned model, so the new removal composes with it.
        event_timeout: seconds for the whole event (graph build, exclusion probing, surgery), or None (default)
            for no bound; past it :class:`~lightning_prune.errors.EventTimeoutError` is raised, naming
            ``event_timeout``, and the model is left unchanged. ``build_timeout`` still bounds the build alone.
        **graph_kwargs: passed to :class:`~lightning_prune.structure.DependencyGraph` (``trace_mode``,
            ``build_timeout``, ``customized_pruners``...).

    Returns:
        A :class:`PruneReport`: FLOPs/params before and after, per-group widths, and the plan (plain data) to
        rebuild the architecture with :func:`~lightning_prune.apply_plan`.

    Every argument is checked before the model is touched; on any error the model is left exactly as it was.
    """
    _check_prune_arguments(model, ignore=ignore, dataloader=dataloader, batch_fn=batch_fn,
                           val_dataloader=val_dataloader, sensitivity=sensitivity, plan=plan, graph_kwargs=graph_kwargs)
    target, target_kind = resolve_target(amount, flops_reduction, latency_reduction, default_amount=0.5)
    allocation = resolve_allocation(allocation, scope)
    latency_dtype = check_latency_arguments(target_kind, round_to, latency_input, latency_dtype, allocation)
    check_fraction("max_group_sparsity", max_group_sparsity, allow_zero=False)
    if round_to is not None and round_to != "auto":
        check_positive_int("round_to", round_to)
    if scoring_batches is not None:
        check_positive_int("scoring_batches", scoring_batches)
    criterion = criteria_module.get(criterion)
    check_positive_int("recalibrate_batches", recalibrate_batches, minimum=0)
    sensitivity_allocator(sensitivity)  # unknown or invalid options fail here, before the model is touched
    wants_recalibration = recalibrate_batches or (sensitivity or {}).get("recalibrate_batches")
    if wants_recalibration and dataloader is None:
        raise ValueError("recalibrate_batches re-estimates BatchNorm statistics on training batches: pass "
                         "dataloader=.")
    if criterion.requires_data and dataloader is None:
        raise ValueError(
            f"criterion={getattr(criterion, 'name', criterion)!r} is data-driven: pass dataloader= (and optionally "
            "scoring_batches=)."
        )
    deadline = EventDeadline(check_number("event_timeout", event_timeout, minimum=0, exclusive_minimum=True,
                                          allow_none=True))
    graph = _bounded_graph(model, example_inputs, deadline, ignore=ignore, plan=plan, **graph_kwargs)
    evaluate = _accuracy_evaluator(model, val_dataloader, batch_fn) if val_dataloader is not None else None
    latency = None
    if target_kind == "latency":
        latency = LatencyTarget(example_inputs if latency_input is None else latency_input, latency_dtype,
                                cache_dir=latency_cache)
    return prune_event(
        graph, criterion, target, target_kind=target_kind, allocation=allocation, round_to=round_to,
        max_group_sparsity=max_group_sparsity, dataloader=dataloader, scoring_batches=scoring_batches,
        batch_fn=batch_fn, evaluate=evaluate, sensitivity=sensitivity, recalibration_data=dataloader,
        recalibrate_batches=recalibrate_batches, latency=latency, event_timeout=deadline, source="prune",
    )


def _bounded_graph(model: nn.Module, example_inputs: Any, deadline: EventDeadline, **kwargs: Any) -> DependencyGraph:
    """The event's graph, its build bounded by ``build_timeout`` and by what is left of ``event_timeout``."""
    kwargs["build_timeout"] = deadline.bound(kwargs.get("build_timeout", 120.0))
    try:
        return DependencyGraph(model, example_inputs, **kwargs)
    except GraphBuildTimeout as error:
        if deadline.expired():
            raise deadline.error("building the dependency graph") from error
        raise


def _check_prune_arguments(model: Any, *, ignore: Any, dataloader: Any, batch_fn: Any, val_dataloader: Any,
                           sensitivity: Any, plan: Any, graph_kwargs: dict[str, Any]) -> None:
    """Type checks of :func:`prune`'s arguments, each error naming the argument (values are checked after)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(ignore, nn.Module):
        entries = [ignore] if isinstance(ignore, str) else ignore
        if not isinstance(entries, (list, tuple, set, frozenset)) or not all(
                isinstance(e, (str, nn.Module)) for e in entries):
            raise ArgumentTypeError(f"ignore must be module names or modules (a list), got {ignore!r}.")
    for name, loader in (("dataloader", dataloader), ("val_dataloader", val_dataloader)):
        if loader is not None and (isinstance(loader, (str, bytes, torch.Tensor)) or not hasattr(loader, "__iter__")):
            raise ArgumentTypeError(f"{name} must be an iterable of batches (a DataLoader) or None, got "
                                    f"{type(loader).__name__}.")
    check_callable("batch_fn", batch_fn)
    check_mapping("sensitivity", sensitivity)
    if plan is not None and not isinstance(plan, (dict, PruningPlan)):
        raise ArgumentTypeError(f"plan must be a PruningPlan, its to_dict() or None, got {type(plan).__name__}.")
    check_graph_options("graph_kwargs (extra keyword arguments of prune)", graph_kwargs)


def _accuracy_evaluator(model: nn.Module, dataloader: Iterable, batch_fn: Callable | None,
                        **kwargs: Any) -> AccuracyEvaluator:
    """Top-1 accuracy of ``model`` (eval mode, restored afterwards) on every batch of ``dataloader``: an
    :class:`~lightning_prune.allocation.evaluation.AccuracyEvaluator` (read once, counted, early-exit capable)."""
    return AccuracyEvaluator(model, dataloader, batch_fn, **kwargs)
