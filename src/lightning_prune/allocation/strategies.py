"""Allocation strategies: how a pruning event turns scores into removals, behind one interface.

A pruning event (:func:`lightning_prune.pruning.prune_event`) builds an :class:`AllocationContext` (the graph,
the target, how to score, how to apply a surgery atomically, the validation data) and hands it to the strategy
named by ``allocation``; the strategy calls ``ctx.apply`` as often as it needs and returns whether the target was
met. Registered strategies: ``"uniform"`` and ``"global"`` (:class:`ThresholdAllocation`, one decision per event)
and ``"sensitivity"`` (:class:`SensitivityAllocation`, rounds of trials). A new target (e.g. measured latency)
is a new subclass registered with :func:`register_strategy`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..errors import PruningError
from ..structure import DependencyGraph, FlopsModel
from .core import allocate
from .evaluation import LOCAL, Collective
from .sensitivity import SensitivityAllocator, sensitivity_allocator

log = logging.getLogger("lightning_prune")

Removals = dict[str, list[int]]


@dataclass
class AllocationContext:
    """Everything a strategy may use during one event.

    ``score()`` scores every group with the event's criterion (data-driven criteria see the scoring data);
    ``apply(removals)`` verifies (DDP: every rank agrees), prunes atomically and transplants optimizers, raising
    :class:`PruningError` when the surgery fails (nothing changed then); ``exclude(removals)`` takes the groups
    that broke a surgery out of the graph (False when no single group is to blame); ``evaluate`` measures
    held-out accuracy (``None`` without validation data)."""

    graph: DependencyGraph
    criterion: Any
    target: float
    target_kind: str
    round_to: int | None
    max_group_sparsity: float
    original_flops: float
    score: Callable[[], dict[str, torch.Tensor]]
    apply: Callable[[Removals], None]
    exclude: Callable[[Removals], bool]
    evaluate: Callable[[], float] | None = None
    collective: Collective = LOCAL
    #: ``recalibrator(num_batches)`` -> a callable re-estimating BatchNorm statistics (sensitivity trials)
    recalibrator: Callable[[int], Callable[[], Any]] | None = None
    sensitivity: Mapping[str, Any] = field(default_factory=dict)
    #: a latency target (``allocation.latency.LatencyTarget``) when ``target_kind == "latency"``
    latency: Any = None
    #: the event's FlopsModel of the model at the event's start (built once per event, shared)
    flops_model: FlopsModel | None = None
    #: filled by the strategy: one record per sensitivity round, and why it stopped short of the target
    records: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def example_inputs(self) -> Any:
        return self.graph.example_inputs

    def flops_goal(self) -> float:
        return self.original_flops * (1.0 - self.target)

    def with_retries(self, removals_fn: Callable[[], Removals]) -> Removals:
        """Apply ``removals_fn()``; after a failed surgery exclude the groups to blame and decide again (each retry
        excludes at least one group, so this ends)."""
        while True:
            removals = removals_fn()
            try:
                self.apply(removals)
                return removals
            except PruningError:
                if not self.exclude(removals):
                    raise


class AllocationStrategy:
    """One way to decide removals. Subclasses implement :meth:`run`; :meth:`check` fails before the model is
    touched when the context lacks something the strategy needs."""

    name = "allocation"
    needs_validation = False

    def check(self, ctx: AllocationContext) -> None:
        if self.needs_validation and ctx.evaluate is None:
            raise ValueError(f"allocation={self.name!r} needs validation data: pass val_dataloader (held out from the "
                             "training set, never the test set).")

    def run(self, ctx: AllocationContext) -> bool:
        """Prune ``ctx.graph`` toward ``ctx.target`` through ``ctx.apply``; return whether the target is met."""
        raise NotImplementedError


STRATEGIES: dict[str, Callable[[], AllocationStrategy]] = {}


def register_strategy(name: str) -> Callable:
    def decorator(factory: Callable[[], AllocationStrategy]) -> Callable[[], AllocationStrategy]:
        STRATEGIES[name] = factory
        return factory

    return decorator


def get_strategy(name: str) -> AllocationStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"allocation={name!r} is not supported; accepted values: {', '.join(map(repr, STRATEGIES))}.")
    return STRATEGIES[name]()


# -- uniform / global -------------------------------------------------------------------------------------------
def max_sparsity(groups: Iterable, max_group_sparsity: float) -> float:
    """The channel sparsity reached with every group at its ``max_group_sparsity`` floor."""
    groups = list(groups)
    original = sum(g.original_size for g in groups)
    floor = sum(max(g.min_size, int(g.original_size * (1 - max_group_sparsity) + 0.999999)) for g in groups)
    return 1 - floor / original if original else 0.0


def choose_removals(graph: DependencyGraph, scores: dict[str, torch.Tensor], target: float, *, target_kind: str,
                    allocation: str, round_to: int | None, max_group_sparsity: float,
                    flops_model: FlopsModel | None = None,
                    original_flops: float | None = None) -> tuple[Removals, bool]:
    """Indices to remove per group to reach ``target``, and whether it is reached.

    A channel target goes straight to :func:`allocate`. A FLOPs target is turned into the smallest channel target
    whose predicted FLOPs meet it (bisection over :class:`FlopsModel` predictions, no trial surgery)."""
    groups = graph.groups

    def removals_for(channel_target: float) -> Removals:
        return allocate(groups, scores, channel_target, allocation=allocation, round_to=round_to,
                        max_group_sparsity=max_group_sparsity)

    if target_kind == "channels":
        removals = removals_for(target)
        remaining = sum(g.size - len(removals.get(g.name, [])) for g in groups)
        original = sum(g.original_size for g in groups)
        reached = 1 - remaining / original if original else 0.0
        return removals, (reached >= target - 1.0 / max(original, 1) - 1e-9
                          or reached >= max_sparsity(groups, max_group_sparsity))

    assert flops_model is not None and original_flops
    goal = original_flops * (1.0 - target)

    def predicted(removals: Removals) -> float:
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


class ThresholdAllocation(AllocationStrategy):
    """``"uniform"`` (the same width fraction everywhere) or ``"global"`` (one score threshold): one decision per
    event, from one scoring. A criterion that tunes itself on held-out data at the event's removal counts
    (``criterion.calibrates_on_validation``, e.g. Blend's weight search) is calibrated in between and decides
    again with its calibrated scores."""

    def __init__(self, name: str):
        self.name = name

    def check(self, ctx: AllocationContext) -> None:
        if getattr(ctx.criterion, "calibrates_on_validation", False) and ctx.evaluate is None:
            name = getattr(ctx.criterion, "name", type(ctx.criterion).__name__)
            raise ValueError(f"criterion {name!r} searches its weights on held-out data: pass val_dataloader "
                             "(one-shot prune) or give the trainer a validation dataloader (callback).")

    def run(self, ctx: AllocationContext) -> bool:
        flops_model = ctx.flops_model or FlopsModel(ctx.graph, ctx.example_inputs)
        scores = ctx.score()
        met = False

        def decide() -> Removals:
            nonlocal met
            removals, met = self._decide(ctx, scores, flops_model)
            if getattr(ctx.criterion, "calibrates_on_validation", False):
                counts = {name: len(ix) for name, ix in removals.items()}
                ctx.criterion.calibrate(ctx.graph, ctx.evaluate, counts, collective=ctx.collective)
                removals, met = self._decide(ctx, {g.name: ctx.criterion.score(g) for g in ctx.graph.groups},
                                             flops_model)
            return removals

        ctx.with_retries(decide)
        return met

    def _decide(self, ctx: AllocationContext, scores: dict[str, torch.Tensor],
                flops_model: FlopsModel) -> tuple[Removals, bool]:
        return choose_removals(ctx.graph, scores, ctx.target, target_kind=ctx.target_kind, allocation=self.name,
                               round_to=ctx.round_to, max_group_sparsity=ctx.max_group_sparsity,
                               flops_model=flops_model, original_flops=ctx.original_flops)


register_strategy("uniform")(lambda: ThresholdAllocation("uniform"))
register_strategy("global")(lambda: ThresholdAllocation("global"))


# -- sensitivity ------------------------------------------------------------------------------------------------
@dataclass
class CostEstimate:
    """What a sensitivity event will cost, estimated before its first round from ``trial_sizes``: each round
    removes about ``num_groups`` times the mean FLOPs of one trial."""

    rounds: int
    evaluations_per_round: int
    images_per_evaluation: int | None

    @property
    def evaluations(self) -> int:
        return self.rounds * self.evaluations_per_round

    @property
    def images(self) -> int | None:
        return None if self.images_per_evaluation is None else self.evaluations * self.images_per_evaluation

    def __str__(self) -> str:
        images = f" x {self.images_per_evaluation} validation images = {self.images:.3g} image-forwards" \
            if self.images is not None else ""
        return f"~{self.rounds} rounds x {self.evaluations_per_round} evaluations = ~{self.evaluations}{images}"


def estimate_cost(allocator: SensitivityAllocator, sizes: Mapping[str, int], flops_model: FlopsModel,
                  flops_to_remove: float, images: int | None, world_size: int = 1) -> CostEstimate:
    """Rounds x evaluations x images of the remaining analysis (per rank when the trials are split over
    ``world_size`` ranks)."""
    per_trial = [k * flops_model.delta_per_channel(name) for name, k in sizes.items()]
    per_round = allocator.num_groups * (sum(per_trial) / len(per_trial)) if per_trial else 0.0
    rounds = math.ceil(flops_to_remove / per_round) if per_round > 0 and flops_to_remove > 0 else 0
    if allocator.reuse_prefix:  # every rank makes its own unmasked pass; the replayed trials cost less than this
        evaluations = math.ceil(len(sizes) / max(world_size, 1)) + 1
    else:
        evaluations = math.ceil((len(sizes) + int(allocator.baseline)) / max(world_size, 1))
    return CostEstimate(rounds=rounds, evaluations_per_round=evaluations, images_per_evaluation=images)


class _ScoreCache:
    """Scores reused across the rounds of one event.

    A weight criterion's scores of a group are a function of the group's tensors: they are recomputed only for
    groups whose tensors (identity and shape of every member's parameters and buffers) changed since the last
    round, i.e. groups touched by the last surgery. Data-driven criteria are re-scored every ``rescore_every``
    rounds; in between, the scores of pruned groups are sliced to their surviving channels."""

    def __init__(self, ctx: AllocationContext, rescore_every: int):
        self.ctx, self.rescore_every = ctx, rescore_every
        self.data_driven = bool(getattr(ctx.criterion, "requires_data", False))
        self.scores: dict[str, torch.Tensor] = {}
        self.keys: dict[str, tuple] = {}
        self.age = 0
        self.computed = 0  #: groups scored (for the benchmark)

    @staticmethod
    def _key(group: Any) -> tuple:
        tensors = []
        for member in group.members:
            module = member.module
            tensors.extend((t, tuple(t.shape)) for t in list(module.parameters(recurse=False))
                           + list(module.buffers(recurse=False)))
        return tuple((id(t), shape) for t, shape in tensors), tensors  # the tensors stay referenced: ids stay unique

    def get(self) -> dict[str, torch.Tensor]:
        groups = self.ctx.graph.groups
        if self.data_driven:
            if not self.scores or self.age >= self.rescore_every:
                self.scores, self.age = dict(self.ctx.score()), 0
                self.computed += len(groups)
            self.age += 1
            return {g.name: self.scores[g.name] for g in groups}
        from ..criteria.scoring import score_groups

        stale = []
        for group in groups:
            key, tensors = self._key(group)
            if self.keys.get(group.name, (None,))[0] != key:
                stale.append(group)
                self.keys[group.name] = (key, tensors)
        if stale:
            self.scores.update(score_groups(self.ctx.graph.model, stale, self.ctx.criterion))
            self.computed += len(stale)
        return {g.name: self.scores[g.name] for g in groups}

    def pruned(self, removals: Removals, sizes_before: Mapping[str, int]) -> None:
        """After a surgery: keep the surviving channels' (stale) scores of data-driven criteria."""
        if not self.data_driven:
            return
        for name, indices in removals.items():
            if name in self.scores:
                keep = torch.ones(sizes_before[name], dtype=torch.bool)
                keep[torch.as_tensor(list(indices), dtype=torch.long)] = False
                self.scores[name] = self.scores[name][keep]


class SensitivityAllocation(AllocationStrategy):
    """``"sensitivity"``: paper 2's FLOP-normalized sensitivity analysis, round after round until the target
    (see :class:`SensitivityAllocator` for the options). Before the first round the cost is estimated and logged;
    a progress bar over the rounds shows the ETA (rank zero); ``max_rounds``/``time_budget_s`` stop cleanly."""

    name = "sensitivity"
    needs_validation = True

    def run(self, ctx: AllocationContext) -> bool:
        options = dict(ctx.sensitivity)
        # max_group_sparsity caps every allocation; for sensitivity it is a floor on the width fraction.
        options["min_width_fraction"] = max(options.get("min_width_fraction", 0.125), 1.0 - ctx.max_group_sparsity)
        allocator = sensitivity_allocator(options)
        if allocator.eval_batch_size and getattr(ctx.evaluate, "eval_batch_size", 0) is None:
            ctx.evaluate.eval_batch_size = allocator.eval_batch_size
        recalibrate = ctx.recalibrator(allocator.recalibrate_batches) if allocator.recalibrate_batches else None
        loop = _Rounds(ctx, allocator, recalibrate)
        try:
            return loop.run()
        finally:
            loop.close()


register_strategy("sensitivity")(SensitivityAllocation)


class PredictedFlops(FlopsModel):
    """A :class:`FlopsModel` at new widths predicted from another one, without an fvcore trace (fast mode: exact
    for convolution, linear and normalization layers; other ops are approximated). ``total_measured`` is then a
    prediction (``predicted = True``)."""

    predicted = True

    def __init__(self, source: FlopsModel, widths: Mapping[str, int]):  # noqa: D107 (no fvcore trace)
        self._base = source._base
        self._terms = []
        for flops, out_name, in_name in source._terms:
            factor = 1.0
            if out_name is not None:
                factor *= widths.get(out_name, source._sizes[out_name]) / source._sizes[out_name]
            if in_name is not None:
                factor *= widths.get(in_name, source._sizes[in_name]) / source._sizes[in_name]
            self._terms.append((flops * factor, out_name, in_name))
        self._sizes = {name: widths.get(name, size) for name, size in source._sizes.items()}
        self.total_measured = int(round(self.predict({})))


class _Rounds:
    """The state of one event's sensitivity rounds (bar, clock, caches, the fast mode's lazy rounds)."""

    def __init__(self, ctx: AllocationContext, allocator: SensitivityAllocator, recalibrate: Callable | None):
        self.ctx, self.allocator, self.recalibrate = ctx, allocator, recalibrate
        self.start = time.perf_counter()
        self.cache = _ScoreCache(ctx, allocator.rescore_every)
        self.bar = None
        self.rounds = 0
        self.flops_model: FlopsModel | None = None
        self.removed_flops: list[float] = []

    def run(self) -> bool:
        ctx, allocator = self.ctx, self.allocator
        while True:
            flops_model = self._flops_model()
            met, budget = self._progress_towards_target(flops_model)
            if met:
                return True
            if self._out_of_budget():
                return False
            scores = self.cache.get()
            step = allocator.step(ctx.graph, scores, ctx.evaluate, flops_model, flops_budget=budget,
                                  recalibrate=self.recalibrate, collective=ctx.collective, lazy=self._lazy_round())
            if not step:
                return False
            if ctx.target_kind == "channels":  # do not overshoot a channel target
                original = sum(g.original_size for g in ctx.graph.groups)
                channels = int(round((ctx.target - ctx.graph.channel_sparsity()) * original))
                step = _trim(ctx.graph, step, scores, max(channels, 1))
            sizes_before = ctx.graph.widths()
            try:
                ctx.apply(step)
            except PruningError:
                if not ctx.exclude(step):
                    raise
                continue
            self.cache.pruned(step, sizes_before)
            after = flops_model.predict({n: sizes_before[n] - len(ix) for n, ix in step.items()})
            self.removed_flops.append(flops_model.predict({}) - after)
            self.remaining = max(after - ctx.flops_goal(), 0.0)
            ctx.records.append(_step_record(allocator.last_step, step))
            self.rounds += 1
            self._update_bar()

    def _flops_model(self) -> FlopsModel:
        """One fvcore trace per round at the current widths (exact mode); fast mode predicts between refreshes."""
        graph = self.ctx.graph
        if self.allocator.mode == "fast" and self.flops_model is not None and self.rounds % self.allocator.refresh_every:
            self.flops_model = PredictedFlops(self.flops_model, graph.widths())
        else:
            self.flops_model = FlopsModel(graph, graph.example_inputs)
        return self.flops_model

    def _progress_towards_target(self, flops_model: FlopsModel) -> tuple[bool, float | None]:
        ctx = self.ctx
        if ctx.target_kind == "channels":
            return ctx.graph.channel_sparsity() >= ctx.target - 1e-9, None
        current = flops_model.total_measured
        if current <= ctx.flops_goal():
            if self.allocator.mode == "fast" and getattr(flops_model, "predicted", False):
                fresh = FlopsModel(ctx.graph, ctx.example_inputs)  # confirm a predicted stop with fvcore
                self.flops_model = fresh
                if fresh.total_measured > ctx.flops_goal():
                    return False, fresh.total_measured - ctx.flops_goal()
            return True, None
        budget = current - ctx.flops_goal()
        if self.bar is None:
            self._open_bar(flops_model, budget)
        return False, budget

    def _out_of_budget(self) -> bool:
        allocator = self.allocator
        if allocator.max_rounds is not None and self.rounds >= allocator.max_rounds:
            self.ctx.stop_reason = f"sensitivity analysis stopped after max_rounds={allocator.max_rounds} rounds"
            return True
        elapsed = time.perf_counter() - self.start
        if allocator.time_budget_s is not None:
            # Every rank must stop at the same round: rank zero's clock decides.
            over = self.ctx.collective.gather(elapsed > allocator.time_budget_s)[0]
            if over:
                self.ctx.stop_reason = (f"sensitivity analysis stopped after time_budget_s={allocator.time_budget_s:g} "
                                        f"s ({self.rounds} rounds)")
                return True
        return False

    def _lazy_round(self) -> bool:
        """Fast mode: every ``refresh_every``-th round measures every group, the rounds between are lazy."""
        allocator = self.allocator
        return allocator.mode == "fast" and self.rounds % allocator.refresh_every != 0

    def _open_bar(self, flops_model: FlopsModel, budget: float) -> None:
        ctx, allocator = self.ctx, self.allocator
        sizes = allocator.trial_sizes(ctx.graph, flops_model)
        images = getattr(ctx.evaluate, "total", None)
        split = ctx.collective.world_size if allocator.shard == "groups" and not allocator.recalibrate_batches else 1
        if getattr(ctx.evaluate, "shard_data", False):
            split = 1
            images = math.ceil(images / ctx.collective.world_size) if images else images
        self.estimate = estimate_cost(allocator, sizes, flops_model, budget, images, split)
        message = (f"sensitivity analysis ({allocator.mode}): {len(sizes)} eligible groups, estimated "
                   f"{self.estimate} per rank")
        log.info(message)
        if ctx.collective.rank == 0 and allocator.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(self.estimate.rounds, 1), desc="sensitivity rounds", unit="round")
            self.bar.write(message)
        else:
            self.bar = False

    def _update_bar(self) -> None:
        if not self.bar:
            return
        self.bar.update(1)
        if self.ctx.target_kind == "flops" and self.removed_flops:
            # Refine the total from what the rounds really removed so far.
            per_round = sum(self.removed_flops) / len(self.removed_flops)
            total = self.rounds + (math.ceil(self.remaining / per_round) if per_round > 0 else 0)
            if total != self.bar.total:
                self.bar.total = max(total, self.rounds)
                self.bar.refresh()

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _step_record(step: Any, applied: Removals) -> dict[str, Any]:
    return {
        "baseline": step.baseline,
        "trials": {name: dict(trial) for name, trial in step.trials.items()},
        "chosen": list(applied),
        "removed": {name: len(indices) for name, indices in applied.items()},
        "images": step.images,
        "forward_equivalents": step.forward_equivalents,
    }


def _trim(graph: DependencyGraph, step: Removals, scores: dict[str, torch.Tensor], budget: int) -> Removals:
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
