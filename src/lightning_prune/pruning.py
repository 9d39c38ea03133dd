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
from .allocation import ALLOCATIONS, allocate, sensitivity_allocator
from .errors import (
    ArgumentTypeError,
    PruningError,
    check_callable,
    check_choice,
    check_fraction,
    check_mapping,
    check_positive_int,
)
from .structure import (
    DependencyGraph,
    FlopsModel,
    PruningPlan,
    SurgeryResult,
    check_graph_options,
    count_flops,
    count_params,
    recalibrate_batchnorm,
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

    @property
    def flops_reduction(self) -> float:
        """FLOPs removed relative to the original model (or to this event's start if unknown)."""
        base = self.original_flops or self.flops_before
        return 1.0 - self.flops_after / base if base else 0.0

    @property
    def channel_sparsity(self) -> float:
        original = sum(self.original_widths.values())
        return 1.0 - sum(self.widths_after.values()) / original if original else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flops_reduction"] = self.flops_reduction
        data["channel_sparsity"] = self.channel_sparsity
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
            f"Channels {self.channel_sparsity:.1%} of prunable channels removed; "
            f"{sum(self.removed.values())} this event in {self.seconds:.2f} s",
        ]
        if not self.target_met:
            lines.append(f"WARNING: the {self.target_kind} target {self.target:.1%} could not be met")
        return "\n".join(lines)


def choose_removals(
    graph: DependencyGraph,
    scores: dict[str, torch.Tensor],
    target: float,
    *,
    target_kind: str,
    allocation: str,
    round_to: int | None,
    max_group_sparsity: float,
    flops_model: FlopsModel | None = None,
    original_flops: float | None = None,
) -> tuple[dict[str, list[int]], bool]:
    """Indices to remove per group to reach ``target``, and whether it is reached.

    A channel target goes straight to :func:`allocate`. A FLOPs target is turned into the smallest channel target
    whose predicted FLOPs meet it (bisection over :class:`FlopsModel` predictions, no trial surgery)."""
    groups = graph.groups

    def removals_for(channel_target: float) -> dict[str, list[int]]:
        return allocate(groups, scores, channel_target, allocation=allocation, round_to=round_to,
                        max_group_sparsity=max_group_sparsity)

    if target_kind == "channels":
        removals = removals_for(target)
        remaining = sum(g.size - len(removals.get(g.name, [])) for g in groups)
        original = sum(g.original_size for g in groups)
        reached = 1 - remaining / original if original else 0.0
        return removals, reached >= target - 1.0 / max(original, 1) - 1e-9 or reached >= _max_sparsity(groups, max_group_sparsity)

    assert flops_model is not None and original_flops
    goal = original_flops * (1.0 - target)

    def predicted(removals: dict[str, list[int]]) -> float:
        return flops_model.predict({g.name: g.size - len(removals.get(g.name, [])) for g in groups})

    if predicted({}) <= goal:
        return {}, True
    low, high = graph.channel_sparsity(), 0.999
    best = removals_for(high)
    if predicted(best) > goal:
        return best, False
    for _ in range(40):
        mid = (low + high) / 2
        candidate = removals_for(mid)
        if predicted(candidate) <= goal:
            high, best = mid, candidate
        else:
            low = mid
        if high - low < 1e-4:
            break
    return best, True


def _max_sparsity(groups: Iterable, max_group_sparsity: float) -> float:
    groups = list(groups)
    original = sum(g.original_size for g in groups)
    floor = sum(max(g.min_size, int(g.original_size * (1 - max_group_sparsity) + 0.999999)) for g in groups)
    return 1 - floor / original if original else 0.0


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
    **event_info: Any,
) -> PruneReport:
    """Score, allocate and remove channels until ``target`` is reached. See :func:`prune` for the arguments.

    ``before_surgery(removals)`` may veto a surgery by raising (DDP checks that every rank agrees);
    ``on_surgery`` is called after every successful surgery (an optimizer transplant);
    ``measure=False`` skips the fvcore counts (then the report's FLOPs are predictions).
    ``recalibration_data`` (training batches) feeds BatchNorm re-estimation: in sensitivity trials when the
    allocator's ``recalibrate_batches`` > 0, and after the last surgery when ``recalibrate_batches`` > 0; under
    DDP the statistics are averaged over ``world_size`` ranks with ``reduce_state``."""
    from .criteria.scoring import score_groups

    model, example_inputs = graph.model, graph.example_inputs
    start = time.perf_counter()
    widths_before = graph.widths()
    params_before = count_params(model)
    flops_model = FlopsModel(graph, example_inputs)
    flops_before = flops_model.total_measured
    if original_flops is None:
        original_flops = flops_before

    def score() -> dict[str, torch.Tensor]:
        return score_groups(model, graph.groups, criterion, dataloader, scoring_batches=scoring_batches,
                            batch_fn=batch_fn, loss_fn=loss_fn, reduce_state=reduce_state)

    removed: dict[str, int] = {}
    sensitivity_steps: list[dict[str, Any]] = []

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

    def apply(removals: dict[str, list[int]]) -> None:
        if not removals:
            return
        if before_surgery is not None:
            before_surgery(removals)
        result = graph.prune_groups(removals, **event_info)
        for name, indices in result.removed.items():
            removed[name] = removed.get(name, 0) + len(indices)
        if on_surgery is not None:
            on_surgery(result)

    if allocation == "sensitivity":
        if evaluate is None:
            raise ValueError("allocation='sensitivity' needs validation data: pass val_dataloader (held out from "
                             "the training set, never the test set).")
        options = dict(sensitivity or {})
        # max_group_sparsity caps every allocation; for sensitivity it is a floor on the width fraction.
        options["min_width_fraction"] = max(options.get("min_width_fraction", 0.125), 1.0 - max_group_sparsity)
        allocator = sensitivity_allocator(options)
        trial_recalibration = recalibrator(allocator.recalibrate_batches) if allocator.recalibrate_batches else None
        met = False
        while True:
            if target_kind == "channels":
                met = graph.channel_sparsity() >= target - 1e-9
            flops_model = FlopsModel(graph, example_inputs)  # one fvcore trace per round, at the current widths
            if target_kind == "flops":
                met = flops_model.total_measured <= original_flops * (1 - target)
            if met:
                break
            budget = None if target_kind == "channels" else flops_model.total_measured - original_flops * (1 - target)
            scores = score()
            step = allocator.step(graph, scores, evaluate, flops_model, flops_budget=budget,
                                  recalibrate=trial_recalibration)
            if not step:
                break
            if target_kind == "channels":  # do not overshoot a channel target
                original = sum(g.original_size for g in graph.groups)
                budget = int(round((target - graph.channel_sparsity()) * original))
                step = _trim(graph, step, scores, max(budget, 1))
            try:
                apply(step)
            except PruningError:
                if not exclude_breaking_groups(graph, step):
                    raise
                continue
            sensitivity_steps.append(_step_record(allocator.last_step, step))
    else:
        def decide(scores: dict[str, torch.Tensor]) -> tuple[dict[str, list[int]], bool]:
            return choose_removals(
                graph, scores, target, target_kind=target_kind, allocation=allocation, round_to=round_to,
                max_group_sparsity=max_group_sparsity, flops_model=flops_model, original_flops=original_flops,
            )

        if hasattr(criterion, "search") and evaluate is None:
            raise ValueError("criterion 'blend' searches its weights on held-out data: pass val_dataloader "
                             "(one-shot prune) or give the trainer a validation dataloader (callback).")
        scores = score()
        while True:
            removals, met = decide(scores)
            if hasattr(criterion, "search"):  # Blend: evolve the calibration weights at this event's removal counts
                criterion.search(graph, evaluate, {name: len(ix) for name, ix in removals.items()})
                removals, met = decide({g.name: criterion.score(g) for g in graph.groups})
            try:
                apply(removals)
                break
            except PruningError:
                # Each retry excludes at least one group, so this ends.
                if not exclude_breaking_groups(graph, removals):
                    raise

    if recalibrate_batches and removed:
        recalibrator(recalibrate_batches)()
    flops_after = count_flops(model, example_inputs) if measure else int(FlopsModel(graph, example_inputs).predict({}))
    met = check_target(graph, target, target_kind, flops_after, original_flops, max_group_sparsity, round_to)
    return PruneReport(
        flops_before=flops_before, flops_after=flops_after, params_before=params_before,
        params_after=count_params(model), widths_before=widths_before, widths_after=graph.widths(),
        original_widths=graph.original_widths(), removed=removed, seconds=time.perf_counter() - start,
        target=target, target_kind=target_kind, target_met=met, plan=graph.plan.to_dict(),
        original_flops=original_flops, sensitivity_steps=sensitivity_steps,
    )


def exclude_breaking_groups(graph: DependencyGraph, removals: dict[str, list[int]]) -> bool:
    """After a failed surgery: find the groups among ``removals`` whose removal alone breaks the model, take them
    out of ``graph`` with a warning naming them and why, and return True; False when no single group is to blame
    (then the failure stands)."""
    broken = graph.find_unprunable(list(removals))
    if not broken:
        return False
    graph.exclude(broken)
    details = "; ".join(f"{name}: {reason}" for name, reason in broken.items())
    warnings.warn(f"{len(broken)} channel group(s) cannot be pruned and are left at full width: {details}. "
                  "The rest of the model is pruned (add them to ignore= to skip this check).", stacklevel=3)
    return True


def _step_record(step: Any, applied: dict[str, list[int]]) -> dict[str, Any]:
    return {
        "baseline": step.baseline,
        "trials": {name: dict(trial) for name, trial in step.trials.items()},
        "chosen": list(applied),
        "removed": {name: len(indices) for name, indices in applied.items()},
    }


def _trim(graph: DependencyGraph, step: dict[str, list[int]], scores: dict[str, torch.Tensor],
          budget: int) -> dict[str, list[int]]:
    """Shrink a sensitivity step to remove at most ``budget`` channels: each group keeps its lowest-scored
    channels, in whole grouped-conv positions (a multiple of ``divisions``), so the removal stays symmetric."""
    trimmed = {}
    for name, indices in step.items():
        group = graph.group(name)
        count = min(len(indices), budget - budget % group.divisions)
        if count <= 0:
            continue
        trimmed[name] = group.lowest(scores[name], count)
        budget -= count
    return trimmed or step


def prune(
    model: nn.Module,
    example_inputs: Any,
    criterion: str | criteria_module.Criterion = "l2",
    amount: float | None = None,
    *,
    flops_reduction: float | None = None,
    allocation: str | None = None,
    scope: str | None = None,
    ignore: Iterable[str | nn.Module] = (),
    round_to: int | None = None,
    max_group_sparsity: float = 0.9,
    dataloader: Iterable | None = None,
    scoring_batches: int | None = None,
    batch_fn: Callable | None = None,
    val_dataloader: Iterable | None = None,
    sensitivity: dict[str, Any] | None = None,
    recalibrate_batches: int = 0,
    plan: PruningPlan | dict | None = None,
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
        allocation: how many channels each group loses: ``"uniform"`` (the same fraction everywhere; alias
            ``"layerwise"``), ``"global"`` (one score threshold across groups) or ``"sensitivity"`` (paper 2's
            FLOP-normalized sensitivity analysis; needs ``val_dataloader``). ``scope`` is an accepted older name.
        ignore: module names (or modules) whose output channels are never pruned.
        round_to: keep widths multiples of this (e.g. 8) where possible.
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
        **graph_kwargs: passed to :class:`~lightning_prune.structure.DependencyGraph` (``trace_mode``,
            ``build_timeout``, ``customized_pruners``...).

    Returns:
        A :class:`PruneReport`: FLOPs/params before and after, per-group widths, and the plan (plain data) to
        rebuild the architecture with :func:`~lightning_prune.apply_plan`.

    Every argument is checked before the model is touched; on any error the model is left exactly as it was.
    """
    _check_prune_arguments(model, ignore=ignore, dataloader=dataloader, batch_fn=batch_fn,
                           val_dataloader=val_dataloader, sensitivity=sensitivity, plan=plan, graph_kwargs=graph_kwargs)
    if amount is not None and flops_reduction is not None:
        raise ValueError("Give exactly one of amount (fraction of channels) or flops_reduction (fraction of FLOPs), "
                         f"got amount={amount!r} and flops_reduction={flops_reduction!r}.")
    if amount is None and flops_reduction is None:
        amount = 0.5
    if amount is not None:
        target, target_kind = check_fraction("amount", amount), "channels"
    else:
        target, target_kind = check_fraction("flops_reduction", flops_reduction, allow_zero=False), "flops"
    allocation = resolve_allocation(allocation, scope)
    check_fraction("max_group_sparsity", max_group_sparsity, allow_zero=False)
    if round_to is not None:
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
    graph = DependencyGraph(model, example_inputs, ignore=ignore, plan=plan, **graph_kwargs)
    evaluate = _accuracy_evaluator(model, val_dataloader, batch_fn) if val_dataloader is not None else None
    return prune_event(
        graph, criterion, target, target_kind=target_kind, allocation=allocation, round_to=round_to,
        max_group_sparsity=max_group_sparsity, dataloader=dataloader, scoring_batches=scoring_batches,
        batch_fn=batch_fn, evaluate=evaluate, sensitivity=sensitivity, recalibration_data=dataloader,
        recalibrate_batches=recalibrate_batches, source="prune",
    )


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


def _accuracy_evaluator(model: nn.Module, dataloader: Iterable, batch_fn: Callable | None) -> Callable[[], float]:
    """Top-1 accuracy of ``model`` (eval mode, restored afterwards) on every batch of ``dataloader``."""
    from .criteria.scoring import default_batch_fn

    split = batch_fn or default_batch_fn

    def evaluate() -> float:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        correct = total = 0
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in dataloader:
                    inputs, labels = split(batch)
                    outputs = model(inputs.to(device))
                    if not isinstance(outputs, torch.Tensor):
                        outputs = outputs[0]
                    correct += (outputs.argmax(1).cpu() == labels.cpu()).sum().item()
                    total += labels.numel()
        finally:
            for module, training in modes:
                module.training = training
        return correct / total if total else 0.0

    return evaluate
