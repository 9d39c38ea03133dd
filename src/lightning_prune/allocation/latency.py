"""Allocation to a measured-latency budget (``latency_reduction``).

``latency_reduction=r`` asks that the pruned model's *measured* latency (on the device it trains on, at
``latency_input`` and ``latency_dtype``) be at most ``(1 - r)`` times the dense model's. The event:

1. builds (or reads from the disk cache, or from the callback state) the :class:`LatencyModel` lookup table of
   the dense model; under DDP rank zero builds it and every rank uses rank zero's (so all decide the same);
2. greedy over the table: repeatedly takes the removal step (one ``round_to``/``divisions`` step, a few at a time
   on wide groups) with the lowest *score lost per predicted millisecond saved*, respecting ``max_group_sparsity``
   and the coupled groups of the graph, until the predicted latency meets the budget;
3. applies it and **measures** the pruned model against its pre-event copy (interleaved, the median of per-round
   ratios, measured again and pooled when the result is near the goal); while the measured ratio is above the
   goal (the table is off: functional ops, memory traffic, kernels' block sizes), the budget is lowered in a
   bounded step (:func:`correction_factor`: half of the remaining way while far, small steps near the goal;
   the first plan, too, goes only half of the way when the goal is far), and step 2 continues from the pruned
   model, at most ``max_calibrations`` correction steps, each recorded
   (``PruneReport.latency_steps``). Rank zero measures, every rank uses its number. Each step is first made
   *tentatively* and measured; one that lands far below the goal (:func:`overshot`: a kernel block's time gone
   at once) is taken back and tried at half its size, so the event does not prune more than asked.

[design] The event *plans* for ``goal x (1 - AIM_MARGIN)`` and *accepts* a measured ratio at or below the goal:
on a loaded machine one interleaved measurement of the ratio moves by a few percent between runs, and the
issue's 5 % tolerance (:data:`TOLERANCE`) is meant for that noise, not for the event's own shortfall.

Scores are compared across groups after dividing each group's scores by their mean (a scale-free importance, as
raw filter norms differ by layer) and by its width (a share of the group). ``round_to="auto"`` keeps each group's
widths on the step its measured kernels favour (the table's step probes, :func:`auto_step`), else on steps of 8
(CPU oneDNN blocks, CUDA fp32) or 16 (CUDA half/bf16 tensor cores); smaller for groups too narrow for it.
"""
from __future__ import annotations

import logging
import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import torch

from ..errors import PruningError
from ..structure.latency import (FAULTS_WARNING, LatencyModel, _first_device, allocator_advice, detached_copy,
                                 measure_latency, page_faults_per_forward, time_pair)
from .core import _floor_width, _unit_order
from .strategies import AllocationContext, AllocationStrategy, register_strategy

log = logging.getLogger("lightning_prune")

#: measured latency may exceed the budget by this fraction and still count as met (timing noise)
TOLERANCE = 0.05
#: [design] the event plans this fraction below the goal ratio, so that a later, independent measurement (another
#: load, another run) stays within TOLERANCE of the goal; it costs this much extra pruning
AIM_MARGIN = 0.03
#: [design] a measured ratio within this fraction of the goal is measured further (more rounds, new memory
#: placements, pooled) until its standard error is :data:`PRECISION` of it or ``LatencyTarget.max_rounds`` are spent,
#: so that the decision "correct or stop" is not left to one noisy measurement
CONFIRM_BAND = 0.06
#: the standard error (a fraction of the ratio) a measurement near the goal is timed down to
PRECISION = 0.01
#: [design] the event stops only when the measured ratio is at the goal and this many standard errors above it
#: are still within TOLERANCE of the goal (or it has reached its aim, AIM_MARGIN below the goal): a later,
#: independent measurement then stays within the tolerance; a noisy model (MobileNetV2 on a shared CPU: per-round
#: ratios spread +-15 %) is pruned a step further instead of being stopped on a lucky draw
CONFIDENCE_Z = 2.0
#: each correction step lowers the budget by at least this fraction (a table that predicts nearly no saving would
#: otherwise take steps too small to change the measurement) ...
MIN_CORRECTION = 0.02
#: ... and at most this fraction: [design] small steps, each measured, because where the table is off it is off
#: in both directions (a kernel's block boundaries are between its grid points), and a proportional correction
#: overshot (digits ResNet-20: measured 0.54 -> 0.41 for a goal of 0.50 in one step); channels removed by an
#: overshoot cannot come back
MAX_CORRECTION = 0.06


#: [measured] how fast a unit's cost grows as its group thins: x 1 / kept fraction ** THINNING_POWER. With 1 the
#: greedy cut layers the table calls cheap per millisecond far below uniform (digits ResNet-20: stage-3 convolutions
#: to 18-20 of 64 channels where uniform FLOPs targeting at the same latency keeps 31) and lost 0.38 +- 0.16 points
#: against FLOPs targeting at equal measured latency (20 seeds); with 2, -0.04 +- 0.17 (docs/benchmarks.md section 7)
THINNING_POWER = 2.0


def auto_step(group: Any, device: torch.device, dtype: torch.dtype | None, table: LatencyModel | None = None) -> int:
    """``round_to="auto"``: the width step the hardware's kernels favour for ``group``.

    Read from the latency table's step probes where they show evidence (:meth:`LatencyModel.step`: timings at
    widths a few channels apart); otherwise the fixed rule: 8 (CPU oneDNN blocks, CUDA fp32) or 16 (CUDA
    half/bf16 tensor cores). Smaller for groups too narrow for two measured (four fixed-rule) steps."""
    step = table.step(group.name) if table is not None else None
    # A measured step may use half the group's width (16 -> 8 is a real saving when the kernels pad to 8); the
    # fixed rule, a guess, keeps four steps per group.
    steps_per_group = 2 if step is not None else 4
    if step is None:
        step = 16 if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else 8
    while step > 1 and group.original_size < steps_per_group * step:
        step //= 2
    return max(step, group.divisions)


def group_step(group: Any, round_to: int | str | None, device: torch.device, dtype: torch.dtype | None,
               table: LatencyModel | None = None) -> int:
    if round_to == "auto":
        step = auto_step(group, device, dtype, table)
    else:
        step = int(round_to or 1)
    step = math.lcm(step, group.divisions) if step % group.divisions else step
    return step if step < group.size else group.divisions


class StepTiming(NamedTuple):
    """A pair timed alternately (:meth:`LatencyTarget.time_against`): the reference's and the model's median ms,
    the model / reference ratio (median of per-round ratios), the rounds and the ratio's standard error; a latency
    step adds the table's prediction for the model."""

    reference_ms: float
    model_ms: float
    ratio: float
    rounds: int
    standard_error: float
    predicted_ms: float | None = None


@dataclass
class LatencyTarget:
    """What an event needs to prune to a latency budget, and what it measured (kept by the callback between
    events: the table, the dense latency, the cumulative measured ratio)."""

    inputs: Any
    dtype: torch.dtype | None = None
    cache_dir: Any = None
    table: LatencyModel | None = None
    #: cumulative measured latency ratio of the model vs the dense one (1.0 before any pruning)
    ratio: float = 1.0
    rounds: int = 10
    #: memory placements each comparison is spread over (:func:`~lightning_prune.structure.latency.interleaved_times`)
    placements: int = 4
    #: the most rounds one comparison near the goal is extended to (:data:`CONFIRM_BAND`)
    max_rounds: int = 120
    max_calibrations: int = 8
    records: list[dict[str, Any]] = field(default_factory=list)
    before_ms: float | None = None
    after_ms: float | None = None
    predicted_ms: float | None = None
    #: page faults of one warm forward pass of the model on CPU (rank zero; None where not counted)
    page_faults: float | None = None
    #: whether :meth:`check_allocator` ran (else it runs when the table is first taken; the callback runs it
    #: before training)
    allocator_checked: bool = False

    def ensure_table(self, graph: Any, collective: Any) -> LatencyModel:
        if self.table is None:
            data = None
            if collective.rank == 0:
                if not self.allocator_checked:
                    self.check_allocator(graph.model)
                data = LatencyModel.build(graph, self.inputs, self.dtype, cache_dir=self.cache_dir).to_dict()
            data = collective.gather(data)[0]  # rank zero's table on every rank
            self.table = LatencyModel.from_dict(data)
        return self.table

    def check_allocator(self, model: torch.nn.Module) -> None:
        """Warn when the model's warm CPU forward pass page-faults (:data:`FAULTS_WARNING`): its latency then
        depends on the memory allocator's state, which no number of rounds averages out within one process."""
        self.allocator_checked = True
        self.page_faults = page_faults_per_forward(model, self.inputs)
        if self.page_faults is not None:
            log.info("latency: %.0f page faults per warm forward pass on CPU", self.page_faults)
            if self.page_faults >= FAULTS_WARNING:
                warnings.warn(allocator_advice(self.page_faults), RuntimeWarning, stacklevel=2)

    def measure(self, model: torch.nn.Module, collective: Any) -> float:
        value = measure_latency(model, self.inputs, self.dtype, rounds=self.rounds) if collective.rank == 0 else None
        return float(collective.gather(value)[0])

    def measure_against(self, reference: torch.nn.Module | None, model: torch.nn.Module, collective: Any,
                        goal: float | None = None) -> StepTiming | None:
        """:meth:`time_against` on rank zero, broadcast; None without a ``reference``."""
        value = None
        if collective.rank == 0 and reference is not None:
            value = self.time_against(reference, model, goal)
        return collective.gather(value)[0]

    def time_against(self, reference: torch.nn.Module, model: torch.nn.Module,
                     goal: float | None = None) -> StepTiming:
        """``reference`` and ``model`` (:class:`StepTiming`, without a prediction) timed alternately
        over :attr:`placements` memory placements (load cancels in their ratio). The ratio is the median of
        per-round ratios; when it lies within :data:`CONFIRM_BAND` of ``goal`` (a relative ratio), the pair is
        timed further until the standard error is :data:`PRECISION` of it or :attr:`max_rounds` are spent."""
        timing = time_pair(reference, model, self.inputs, self.dtype, rounds=2 * self.rounds,
                           placements=self.placements, precision=PRECISION, max_rounds=self.max_rounds,
                           goal=goal, band=CONFIRM_BAND)
        return StepTiming(statistics.median(timing.first), statistics.median(timing.second), timing.ratio,
                          timing.rounds, timing.standard_error)

    @property
    def device(self) -> torch.device:
        return _first_device(self.inputs)

    @property
    def dense_ms(self) -> float:
        return self.table.dense_ms if self.table is not None else float("nan")


def correction_factor(aim: float, measured: float) -> float:
    """How much lower the next step plans (table budget / predicted ms now), ``measured`` the ratio now (vs the
    event's start or the dense model alike). [design] Approach from above: far from ``aim``, half of the way
    in log terms (the table's error is re-measured at every step, and where the table is off it is off in both
    directions: a proportional step overshot, e.g. digits ResNet-20 0.54 -> 0.41 for a goal of 0.50, and channels
    removed by an overshoot cannot come back); near it, one small step (:data:`MIN_CORRECTION` to
    :data:`MAX_CORRECTION`)."""
    full = aim / measured
    if full < 1.0 - 3 * MAX_CORRECTION:
        return math.sqrt(full)
    return min(max(full, 1.0 - MAX_CORRECTION), 1.0 - MIN_CORRECTION)


#: [design] a step whose measured ratio lands more than this fraction (twice the tolerance) below the goal is taken
#: back (it was only tentative) and tried again at half its size (log terms of the table budget), at most
#: :data:`MAX_TAKE_BACKS` times in a row. [measured] Where kernels run in blocks of channels, one small step of the
#: table can remove a block's time at once (resnet56 at a goal of 0.5: a 6 % lower table budget, predicted -7 %,
#: measured 0.518 -> 0.425), and channels removed for good cannot come back.
OVERSHOOT = 0.10
MAX_TAKE_BACKS = 2


def overshot(ratio: float, goal: float) -> bool:
    """Whether a measured ``ratio`` is so far below the ``goal`` that a smaller step should be tried instead."""
    return ratio < goal * (1.0 - OVERSHOOT)


def settled(ratio: float, error: float, goal: float, aim: float) -> bool:
    """Whether the event may stop at a measured ``ratio`` (standard ``error``): at the goal, and either
    :data:`CONFIDENCE_Z` errors above it still within :data:`TOLERANCE`, or at the aim already (a further step
    would trade accuracy for the measurement's noise)."""
    if ratio > goal:
        return False
    return ratio + CONFIDENCE_Z * error <= goal * (1 + TOLERANCE) or ratio <= aim


def plan_widths(graph: Any, scores: Mapping[str, torch.Tensor], table: LatencyModel, budget_ms: float, *,
                round_to: int | str | None, max_group_sparsity: float, device: torch.device,
                dtype: torch.dtype | None, chunks: int = 32) -> dict[str, int]:
    """Greedy: new width per group so that ``table.predict(widths) <= budget_ms``, removing first where the score
    lost per predicted millisecond saved is lowest. A move removes ``k`` steps of a group (``k`` about 1/``chunks``
    of its original width, at least one step)."""
    ladders = {g.name: _GroupLadder.of(g, scores[g.name], table, round_to, max_group_sparsity, device, dtype, chunks)
               for g in graph.groups}
    widths = {name: ladder.group.size for name, ladder in ladders.items()}
    scale = table.scale()
    moves = {name: ladder.best_move(widths, table, scale) for name, ladder in ladders.items()}
    predicted = table.predict(widths)
    while predicted > budget_ms:
        options = [(m[0], i, name, m[1]) for i, (name, m) in enumerate(moves.items()) if m is not None]
        if not options:
            break
        _, _, name, lower = min(options)
        if table.predict({**widths, name: lower}) < budget_ms:
            lower = ladders[name].widest_within(widths, table, budget_ms, lower)
        widths[name] = lower
        predicted = table.predict(widths)
        for other in _sharing_layers_with(table, name) & moves.keys():
            moves[other] = ladders[other].best_move(widths, table, scale)
    return widths


@dataclass
class _GroupLadder:
    """One group's moves in :func:`plan_widths`: the widths it may take (its step grid down to its floor) and the
    score each removed unit loses."""

    group: Any
    step: int
    floor: int
    lost_before: list[float]  # lost_before[u]: the normalized score of the group's u lowest units
    move: int  # the widths tried: every move-th on the grid

    @classmethod
    def of(cls, g: Any, scores: torch.Tensor, table: LatencyModel, round_to: int | str | None,
           max_group_sparsity: float, device: torch.device, dtype: torch.dtype | None, chunks: int) -> "_GroupLadder":
        units = _unit_order(g, scores)  # (score, position), lowest first; one unit = divisions channels
        values = [s for s, _ in units]
        mean = sum(values) / len(values) if values else 1.0
        # [design] Removing a unit costs its share of its group's importance (score / mean / units of the original
        # group: scale-free, as raw filter norms differ by layer) times the group's share of the dense model's table
        # time, more the thinner the group already is (1 / kept fraction ** THINNING_POWER). The time weight is a
        # prior that a group matters in proportion to the work it carries: a ResNet's residual stream feeds every
        # block of its stage, so a channel of it saves several layers' time, and with equal per-group importance the
        # greedy emptied the streams first (digits ResNet-20: 2 of 16 stem channels kept, 1-3 points of accuracy lost
        # vs uniform pruning). With the weight, cost per millisecond is equal across groups where time shrinks in
        # proportion to width; the allocation departs from uniform where the scores or the measured kernels (blocks,
        # memory-bound layers) make some channels cheaper per millisecond.
        done = (g.original_size - g.size) // g.divisions
        total_units = max(g.original_size // g.divisions, 1)
        weight = table.group_ms(g.name, table.dense_widths) / table.dense_sum if table.dense_sum > 0 else 1.0
        normalized = [(v / mean if mean > 0 else v) * weight / total_units
                      / max(1.0 - (done + k) / total_units, 0.05) ** THINNING_POWER for k, v in enumerate(values)]
        step = group_step(g, round_to, device, dtype, table)
        return cls(group=g, step=step, floor=_floor_width(g, max_group_sparsity, step),
                   lost_before=[0.0] + list(_cumsum(normalized)),
                   move=step * max(1, round(g.original_size / chunks / step)))

    def best_move(self, widths: Mapping[str, int], table: LatencyModel, scale: float) -> tuple[float, int] | None:
        """``(score lost per millisecond saved, new width)`` of the group's best move, or None: over the widths on
        its step grid between its current width and its floor (every ``move``-th, plus the next step). Looking
        past the next step matters: kernels are not monotonic in width (a 12-channel conv can be slower than a
        16-channel one), so a myopic step may save nothing."""
        g, name, width = self.group, self.group.name, widths[self.group.name]
        one_step = self.step * ((width - 1) // self.step)  # the next width on the step grid
        lowers = sorted({w for w in range(one_step, self.floor - 1, -self.move) if w > 0} |
                        ({one_step} if one_step >= self.floor else set()), reverse=True)
        if not lowers:
            return None
        now = table.group_ms(name, widths)
        first_unit = (g.size - width) // g.divisions
        best = None
        for lower in lowers:
            saved = (now - table.group_ms(name, {**widths, name: lower})) * scale
            if saved <= 1e-9:
                continue
            lost = self.lost_before[(g.size - lower) // g.divisions] - self.lost_before[first_unit]
            if best is None or lost / saved < best[0]:
                best = (lost / saved, lower)
        return best

    def widest_within(self, widths: Mapping[str, int], table: LatencyModel, budget_ms: float, lower: int) -> int:
        """A move to ``lower`` overshoots the budget: the widest width on the grid above it that still meets the
        budget, so the last move removes no more than needed (``lower`` if none does)."""
        name = self.group.name
        for width in range(self.step * ((widths[name] - 1) // self.step), lower, -self.step):
            if width >= self.floor and table.predict({**widths, name: width}) <= budget_ms:
                return width
        return lower


def _sharing_layers_with(table: LatencyModel, name: str) -> set[str]:
    """``name`` and the groups on the other side of its layers: a move of ``name`` changes their layers' times."""
    return {name} | {other for layer in table.by_group.get(name, ()) for other in
                     (table.entries[layer]["in_group"], table.entries[layer]["out_group"]) if other}


def _cumsum(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def removals_for(graph: Any, scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, list[int]]:
    return {g.name: g.lowest(scores[g.name], g.size - widths[g.name]) for g in graph.groups
            if widths.get(g.name, g.size) < g.size}


class LatencyAllocation(AllocationStrategy):
    """The ``"latency"`` target: greedy over the latency table, then measure and calibrate (see module doc)."""

    name = "latency"

    def check(self, ctx: AllocationContext) -> None:
        if not isinstance(ctx.latency, LatencyTarget):
            raise ValueError("a latency target needs latency_input (or an example input) to measure on.")

    def run(self, ctx: AllocationContext) -> bool:
        target: LatencyTarget = ctx.latency
        graph, collective = ctx.graph, ctx.collective
        table = target.ensure_table(graph, collective)
        goal_ratio = 1.0 - ctx.target  # cumulative, vs the dense model
        start_ratio = target.ratio
        if start_ratio <= goal_ratio:
            before = target.measure(graph.model, collective)
            target.before_ms = before
            target.after_ms, target.predicted_ms = before, table.predict(graph.widths())
            return True
        aim = goal_ratio * (1.0 - AIM_MARGIN)
        now = table.predict(graph.widths())
        # The budget in table units: the table's prediction now times the first step's share of the ratio to go.
        budget = now * correction_factor(aim, start_ratio)
        measured_ratio = start_ratio
        # The model as it is now, to time against after each surgery (alternating, so a shared machine's load
        # cancels); a model that cannot be copied is timed alone.
        reference = detached_copy(graph.model) if collective.rank == 0 else None
        step = taken_back = 0
        while step <= target.max_calibrations:
            removals = self._plan(ctx, table, budget)
            if not removals:
                log.info("latency step %d: nothing left to remove (every group at its floor)", step)
                break
            trial = self._try(ctx, target, reference, removals, goal_ratio / start_ratio)
            if (trial is not None and overshot(start_ratio * trial.ratio, goal_ratio) and taken_back < MAX_TAKE_BACKS
                    and step < target.max_calibrations):
                self._record(target, step, "taken back", budget, trial, start_ratio, goal_ratio)
                budget, step, taken_back = now * math.sqrt(budget / now), step + 1, taken_back + 1
                continue
            measured_ratio, error = self._commit(ctx, target, reference, removals, trial, step, budget,
                                                 start_ratio, goal_ratio)
            step, taken_back, now = step + 1, 0, table.predict(graph.widths())
            if settled(measured_ratio, error, goal_ratio, aim):
                break
            budget = now * correction_factor(aim, measured_ratio)
        del reference
        if target.after_ms is None:
            target.before_ms = target.after_ms = target.measure(graph.model, collective)
            target.predicted_ms = table.predict(graph.widths())
        target.ratio = measured_ratio
        return measured_ratio <= goal_ratio * (1 + TOLERANCE)

    @staticmethod
    def _plan(ctx: AllocationContext, table: LatencyModel, budget: float) -> dict[str, list[int]]:
        """The removals that bring the table's prediction to ``budget`` (ms), from fresh scores."""
        target, graph = ctx.latency, ctx.graph
        scores = ctx.score()
        widths = plan_widths(graph, scores, table, budget, round_to=ctx.round_to,
                             max_group_sparsity=ctx.max_group_sparsity, device=target.device, dtype=target.dtype)
        return removals_for(graph, scores, widths)

    @staticmethod
    def _try(ctx: AllocationContext, target: LatencyTarget, reference: torch.nn.Module | None,
             removals: dict[str, list[int]], relative_goal: float) -> StepTiming | None:
        """Rank zero prunes ``removals`` tentatively (:meth:`DependencyGraph.tentatively`: put back afterwards,
        unseen by optimizers and other callbacks) and times the result against ``reference``: the
        :class:`StepTiming` with the table's prediction, broadcast; None where it cannot
        be tried (no reference copy, or the surgery fails: the commit then finds the groups to blame)."""
        value = None
        if ctx.collective.rank == 0 and reference is not None:
            try:
                with ctx.graph.tentatively(removals) as model:
                    value = target.time_against(reference, model, relative_goal)._replace(
                        predicted_ms=target.table.predict(ctx.graph.widths()))
            except PruningError:
                pass  # nothing was tried (the model is as it was): the commit finds the groups to blame
        return ctx.collective.gather(value)[0]

    def _commit(self, ctx: AllocationContext, target: LatencyTarget, reference: torch.nn.Module | None,
                removals: dict[str, list[int]], trial: StepTiming | None, step: int, budget: float, start_ratio: float,
                goal_ratio: float) -> tuple[float, float]:
        """Apply ``removals`` (after a failed surgery the groups to blame leave the graph, and the rest is
        applied); the trial's measurement stands for the model when it is what was applied, else the model is
        measured now. Returns the cumulative ratio and its standard error."""
        graph = ctx.graph
        applied = ctx.with_retries(lambda: {name: ix for name, ix in removals.items()
                                            if name in {g.name for g in graph.groups}})
        if trial is None or applied != removals:
            relative_goal = goal_ratio / start_ratio
            trial = target.measure_against(reference, graph.model, ctx.collective, goal=relative_goal)
            if trial is None:  # no copy to time against: time the model alone against the table's dense ms
                before = target.before_ms or target.table.dense_ms * start_ratio
                after = target.measure(graph.model, ctx.collective)
                trial = StepTiming(before, after, after / before, target.rounds, 0.0)
            trial = trial._replace(predicted_ms=target.table.predict(graph.widths()))
        first = not any(r["kind"] in ("plan", "correction") for r in target.records)
        return self._record(target, step, "plan" if first else "correction", budget, trial, start_ratio,
                            goal_ratio, committed=True)

    @staticmethod
    def _record(target: LatencyTarget, step: int, kind: str, budget: float, trial: StepTiming, start_ratio: float,
                goal_ratio: float, committed: bool = False) -> tuple[float, float]:
        """Record and log one measured step; the cumulative ratio and its standard error."""
        ratio, error = start_ratio * trial.ratio, start_ratio * trial.standard_error
        if committed:
            target.before_ms, target.after_ms = trial.reference_ms, trial.model_ms
            target.predicted_ms = trial.predicted_ms
        target.records.append({"step": step, "kind": kind, "budget_ms": budget, "predicted_ms": trial.predicted_ms,
                               "measured_ms": trial.model_ms, "measured_ratio": ratio, "goal_ratio": goal_ratio,
                               "rounds": trial.rounds, "standard_error": error})
        log.info("latency step %d (%s): predicted %.2f ms, measured %.2f ms, ratio %.3f +- %.3f (goal %.3f, "
                 "%d rounds)", step, kind, trial.predicted_ms, trial.model_ms, ratio, error, goal_ratio, trial.rounds)
        return ratio, error


register_strategy("latency")(LatencyAllocation)


# -- arguments (shared by prune(), PruneCallback and the CLI) -----------------------------------------------------
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_target(amount: float | None, flops_reduction: float | None, latency_reduction: float | None, *,
                   default_amount: float | None = None, owner: str = "prune") -> tuple[float, str]:
    """``(target, target_kind)`` from exactly one of ``amount`` / ``flops_reduction`` / ``latency_reduction``."""
    from ..errors import check_fraction

    given = {k: v for k, v in (("amount", amount), ("flops_reduction", flops_reduction),
                               ("latency_reduction", latency_reduction)) if v is not None}
    if not given and default_amount is not None:
        given = {"amount": default_amount}
    if len(given) != 1:
        got = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"
        raise ValueError(f"{owner} needs exactly one of amount (fraction of channels), flops_reduction (fraction of "
                         f"FLOPs) or latency_reduction (fraction of measured latency); got {got}.")
    (name, value), = given.items()
    if name == "amount":
        return check_fraction("amount", value), "channels"
    kind = "flops" if name == "flops_reduction" else "latency"
    return check_fraction(name, value, allow_zero=False), kind


def check_latency_arguments(target_kind: str, round_to: Any, latency_input: Any, latency_dtype: Any,
                            allocation: str) -> torch.dtype | None:
    """Values of the latency options; returns the dtype. ``round_to="auto"`` and the latency options need
    ``latency_reduction``."""
    from ..errors import ArgumentTypeError

    if round_to == "auto" and target_kind != "latency":
        raise ValueError("round_to='auto' picks widths from the latency table: it needs latency_reduction; pass an "
                         "integer round_to (e.g. 8) or None otherwise.")
    if target_kind != "latency":
        if latency_input is not None or latency_dtype is not None:
            raise ValueError("latency_input and latency_dtype are used by latency_reduction only.")
        return None
    if allocation == "sensitivity":
        raise ValueError("latency_reduction allocates by score lost per millisecond saved (its own allocation); "
                         "allocation='sensitivity' cannot be combined with it (use 'uniform' or 'global', ignored).")
    if latency_input is not None and not isinstance(latency_input, (torch.Tensor, tuple, list, dict)):
        raise ArgumentTypeError(f"latency_input must be a tensor, a tuple of tensors or a dict of keyword inputs "
                                f"(an inference batch), got {type(latency_input).__name__}.")
    if latency_dtype is None or isinstance(latency_dtype, torch.dtype):
        return latency_dtype
    if isinstance(latency_dtype, str) and latency_dtype in DTYPES:
        return DTYPES[latency_dtype]
    raise ValueError(f"latency_dtype={latency_dtype!r} is not supported; accepted values: None, a torch.dtype or "
                     f"{', '.join(map(repr, DTYPES))}.")
