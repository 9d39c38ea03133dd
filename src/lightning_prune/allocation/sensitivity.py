"""FLOP-normalized sensitivity analysis (paper 2, Liu, Wentzlaff & Kung): automatic per-group pruning ratios.

One analysis round (:meth:`SensitivityAllocator.step`):

a. the caller scores every channel of every prunable group (any criterion);
b. ``ΔF_l`` = whole-network FLOPs removed by removing one channel of group ``l``
   (:meth:`FlopsModel.delta_per_channel`, calibrated on fvcore); a group is eligible while it keeps at least
   ``min_width_fraction`` of its original width;
c. ``k_l = int(m · max_l ΔF_l / ΔF_l)`` with ``m = prune_multiple``, so every trial removes about the same FLOPs;
d. for each eligible group alone, its ``k_l`` lowest-scored channels are masked (:meth:`DependencyGraph.masked`,
   exactly the eval-mode output of the pruned network, without surgery) and ``evaluate()`` measures the accuracy
   on a held-out validation split, without retraining;
e. the ``num_groups`` groups whose accuracy dropped least lose their ``k_l`` channels.

:meth:`SensitivityAllocator.plan_to_flops` repeats rounds (re-scoring and physically pruning in between, with an
optional ``on_step`` hook to fine-tune) until the measured fvcore FLOPs reduction reaches the target.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..structure import DependencyGraph, FlopsModel
from ..structure.tracing import preserved_state


@dataclass
class SensitivityStep:
    """What one analysis round measured and chose.

    ``trials[name] = {"k": channels masked, "delta_flops": ΔF_l, "accuracy": accuracy with them masked}``;
    ``chosen`` are the selected groups in selection order and ``removed[name]`` the channels they lose (after
    trimming to a FLOPs budget, if one was given)."""

    baseline: float
    trials: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen: list[str] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    flops_before: int | None = None
    flops_after: int | None = None


@dataclass
class SensitivityResult:
    """Outcome of :meth:`SensitivityAllocator.plan_to_flops`."""

    reached: bool
    target_reduction: float
    reduction: float
    original_flops: float
    final_flops: int
    steps: list[SensitivityStep]
    removed: dict[str, int]
    message: str


class SensitivityAllocator:
    """Per-group pruning amounts from FLOP-normalized sensitivity analysis (paper 2, steps a–e).

    Args:
        prune_multiple: ``m`` in ``k_l = int(m · max ΔF / ΔF_l)`` (default 0.8, the authors' value). Each trial
            removes about ``m · max ΔF`` FLOPs; ``k_l`` is clipped to what the group can lose, rounded down to a
            multiple of the group's ``divisions`` and at least ``divisions``.
        min_width_fraction: a group is eligible while it would keep at least ``ceil(min_width_fraction ·
            original_size)`` channels (and at least ``min_size``) after losing ``k_l`` (default 0.125).
        num_groups: groups pruned per round (the authors' ``num_layers``; default 1).
        progress: show a tqdm progress bar over the trial groups.
        recalibrate_batches: re-estimate BatchNorm statistics on this many training batches before the baseline
            and before each trial (the ``recalibrate`` callable of :meth:`step`; default 0 = no, as in the
            paper). Masked channels shift the inputs of the next BatchNorm; with stale statistics every trial of
            a BatchNorm network can fall to chance accuracy and the ranking becomes noise. [design]

    Deterministic: groups are tried in module order and ties in accuracy are broken by group name. ``evaluate``
    must be deterministic too (fixed validation split, no augmentation); it is called in eval mode under
    ``torch.no_grad()``, with the model's train/eval flags and buffers restored afterwards.

    After :meth:`step`, ``last_step`` holds the measurements (:class:`SensitivityStep`).

    [design] choices beyond the paper: a group whose channels cost no FLOPs (``ΔF_l = 0``) is never eligible;
    the baseline accuracy is measured once per round (for reporting; the ranking only needs the trials);
    :meth:`plan_to_flops` trims the last round's removals to the FLOPs still missing, so the target is reached
    with an overshoot below one ``divisions`` step of one group instead of a whole ``k_l``.
    """

    def __init__(self, prune_multiple: float = 0.8, min_width_fraction: float = 0.125, num_groups: int = 1,
                 progress: bool = True, recalibrate_batches: int = 0):
        if isinstance(prune_multiple, bool) or not isinstance(prune_multiple, (int, float)) or prune_multiple <= 0:
            raise ValueError(f"prune_multiple must be a number > 0, got {prune_multiple!r}.")
        if (isinstance(min_width_fraction, bool) or not isinstance(min_width_fraction, (int, float))
                or not 0.0 <= min_width_fraction < 1.0):
            raise ValueError(f"min_width_fraction must be a number in [0, 1), got {min_width_fraction!r}.")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        self.prune_multiple = float(prune_multiple)
        self.min_width_fraction = float(min_width_fraction)
        self.num_groups = num_groups
        self.progress = bool(progress)
        if isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) or recalibrate_batches < 0:
            raise ValueError(f"recalibrate_batches must be an integer >= 0, got {recalibrate_batches!r}.")
        self.recalibrate_batches = recalibrate_batches
        self.last_step: SensitivityStep | None = None

    # -- step b/c --------------------------------------------------------------------------------------------------
    def min_width(self, group: Any) -> int:
        """The narrowest width ``group`` may reach: ``ceil(min_width_fraction · original)`` rounded up to
        divisions, and at least ``min_size``."""
        div = max(group.divisions, 1)
        floor = max(group.min_size, math.ceil(self.min_width_fraction * group.original_size - 1e-9), 1)
        return div * math.ceil(floor / div)

    def trial_sizes(self, graph: DependencyGraph, flops_model: FlopsModel) -> dict[str, int]:
        """``{group: k_l}`` for every eligible group (step c). Groups whose channels cost no FLOPs are skipped
        (pruning them cannot serve a FLOPs target)."""
        deltas = {g.name: float(flops_model.delta_per_channel(g.name)) for g in graph.groups}
        capacities = {}
        for g in graph.groups:
            div = max(g.divisions, 1)
            capacity = ((g.size - self.min_width(g)) // div) * div
            if capacity >= div and deltas[g.name] > 0:
                capacities[g.name] = capacity
        if not capacities:
            return {}
        max_delta = max(deltas[name] for name in capacities)
        sizes = {}
        for g in graph.groups:
            if g.name not in capacities:
                continue
            div = max(g.divisions, 1)
            k = int(self.prune_multiple * max_delta / deltas[g.name])
            k = max(div, (k // div) * div)
            sizes[g.name] = min(k, capacities[g.name])
        return sizes

    # -- steps d/e -------------------------------------------------------------------------------------------------
    def step(
        self,
        graph: DependencyGraph,
        scores: Mapping[str, torch.Tensor],
        evaluate: Callable[[], float],
        flops_model: FlopsModel | None = None,
        *,
        flops_budget: float | None = None,
        recalibrate: Callable[[], Any] | None = None,
    ) -> dict[str, list[int]]:
        """One analysis round: returns ``{group: indices to remove}`` for the ``num_groups`` least sensitive
        groups (empty when no group is eligible any more). Nothing is pruned; the model is left unchanged.

        Args:
            graph: the dependency graph of the model (at its current widths).
            scores: one score per current channel of every eligible group (higher = keep).
            evaluate: ``evaluate() -> float``, accuracy (higher = better) of ``graph.model`` on a held-out
                validation split; never the test set.
            flops_model: a :class:`FlopsModel` built at the current widths (built here when omitted).
            flops_budget: optional FLOPs still to remove; the chosen groups' removals are trimmed (keeping the
                lowest-scored channels) so that the predicted removal does not exceed the budget by more than
                one ``divisions`` step of one group. Used by :meth:`plan_to_flops` to land on its target.
            recalibrate: called (in the masked state) before the baseline and each trial is evaluated, e.g.
                ``lambda: recalibrate_batchnorm(model, train_batches, num_batches=4)``; the BatchNorm statistics
                are restored afterwards.
        """
        if flops_model is None:
            flops_model = FlopsModel(graph, graph.example_inputs)
        stale = getattr(flops_model, "_sizes", None)
        if stale is not None and stale != graph.widths():
            raise ValueError("flops_model was built at other widths than the graph's current ones; rebuild it "
                             "with FlopsModel(graph, example_inputs) after every prune.")
        sizes = self.trial_sizes(graph, flops_model)
        by_name = {g.name: g for g in graph.groups}
        trial_removals = {}
        for name, k in sizes.items():
            if name not in scores:
                raise ValueError(f"scores: no scores for group {name!r}.")
            trial_removals[name] = by_name[name].lowest(scores[name], k)

        model = graph.model
        result = SensitivityStep(baseline=float("nan"))
        with preserved_state(model), torch.no_grad():
            model.eval()
            if recalibrate is not None:
                recalibrate()
            result.baseline = float(evaluate())
            for name in self._progress(list(trial_removals)):
                with graph.masked({name: trial_removals[name]}):
                    if recalibrate is not None:
                        recalibrate()
                    accuracy = float(evaluate())
                result.trials[name] = {"k": sizes[name], "delta_flops": float(flops_model.delta_per_channel(name)),
                                       "accuracy": accuracy}
        ranking = sorted(result.trials, key=lambda n: (result.baseline - result.trials[n]["accuracy"], n))
        chosen = ranking[: self.num_groups]

        removals: dict[str, list[int]] = {}
        budget = None if flops_budget is None else float(flops_budget)
        widths: dict[str, int] = {}
        base = flops_model.predict({})
        for name in chosen:
            if budget is not None and budget <= 0:
                break
            indices = trial_removals[name]
            group = by_name[name]
            if budget is not None:
                div = max(group.divisions, 1)
                k = div
                while k < len(indices):
                    trial = dict(widths, **{name: group.size - k})
                    if base - flops_model.predict(trial) >= float(flops_budget):
                        break
                    k += div
                indices = group.lowest(scores[name], k)
                widths[name] = group.size - k
                budget = float(flops_budget) - (base - flops_model.predict(widths))
            removals[name] = indices
        result.chosen = list(removals)
        result.removed = {name: len(ix) for name, ix in removals.items()}
        self.last_step = result
        return removals

    def _progress(self, names: list[str]) -> Any:
        if not self.progress:
            return names
        from tqdm.auto import tqdm

        return tqdm(names, desc="sensitivity", unit="group", leave=False)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def plan_to_flops(
        self,
        graph: DependencyGraph,
        scores_fn: Callable[[], Mapping[str, torch.Tensor]],
        evaluate: Callable[[], float],
        example_inputs: Any,
        flops_reduction: float,
        *,
        original_flops: float | None = None,
        max_steps: int | None = None,
        on_step: Callable[[SensitivityStep, DependencyGraph], None] | None = None,
        recalibrate: Callable[[], Any] | None = None,
    ) -> SensitivityResult:
        """Prune ``graph.model`` in place, round after round, until the fvcore FLOPs reduction reaches
        ``flops_reduction``.

        Every round re-scores (``scores_fn() -> {group: scores}``), runs :meth:`step` with the remaining FLOPs as
        budget, physically prunes the chosen groups (:meth:`DependencyGraph.prune_groups`) and calls
        ``on_step(step, graph)`` (e.g. to fine-tune, as the paper retrains between rounds; an optimizer must be
        rebuilt or transplanted after surgery). The reduction is measured with fvcore after every round against
        ``original_flops``, the FLOPs at the ORIGINAL widths: pass it when the model was already pruned; by
        default it is the current count, or, for an already pruned graph, the :class:`FlopsModel` prediction at
        the original widths (exact for convolution, linear and normalization layers).

        Returns a :class:`SensitivityResult`. When every group is at its minimum width (or ``max_steps`` ran
        out) before the target, ``reached`` is False, a warning is issued and ``message`` says why.
        """
        if (isinstance(flops_reduction, bool) or not isinstance(flops_reduction, (int, float))
                or not 0.0 <= flops_reduction < 1.0):
            raise ValueError(f"flops_reduction must be a number in [0, 1), got {flops_reduction!r}.")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise ValueError(f"max_steps must be None or an integer >= 0, got {max_steps!r}.")
        flops_model = FlopsModel(graph, example_inputs)
        if original_flops is None:
            original_flops = (flops_model.total_measured if graph.original_widths() == graph.widths()
                              else flops_model.predict(graph.original_widths()))
        if original_flops <= 0:
            raise ValueError(f"original_flops must be > 0, got {original_flops!r}.")
        target_flops = float(original_flops) * (1.0 - float(flops_reduction))
        steps: list[SensitivityStep] = []
        removed: dict[str, int] = {}
        message = ""
        while True:
            current = flops_model.total_measured
            if current <= target_flops + 1e-6:
                reached = True
                break
            if max_steps is not None and len(steps) >= max_steps:
                reached = False
                message = f"max_steps={max_steps} rounds were not enough"
                break
            removals = self.step(graph, scores_fn(), evaluate, flops_model, flops_budget=current - target_flops,
                                 recalibrate=recalibrate)
            if not removals:
                reached = False
                message = "every group is at its minimum width (min_width_fraction)"
                break
            step = self.last_step
            assert step is not None
            step.flops_before = int(current)
            graph.prune_groups(removals, source="sensitivity")
            for name, indices in removals.items():
                removed[name] = removed.get(name, 0) + len(indices)
            flops_model = FlopsModel(graph, example_inputs)
            step.flops_after = int(flops_model.total_measured)
            steps.append(step)
            if on_step is not None:
                on_step(step, graph)
                flops_model = FlopsModel(graph, example_inputs)  # on_step may not change widths, but be safe
        final = int(flops_model.total_measured)
        reduction = 1.0 - final / float(original_flops)
        if not reached:
            message = (f"FLOPs reduction target {flops_reduction:.4f} not reached: {message}; "
                       f"reached {reduction:.4f} after {len(steps)} rounds.")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            message = f"reached FLOPs reduction {reduction:.4f} (target {flops_reduction:.4f}) in {len(steps)} rounds."
        return SensitivityResult(reached=reached, target_reduction=float(flops_reduction), reduction=reduction,
                                 original_flops=float(original_flops), final_flops=final, steps=steps,
                                 removed=removed, message=message)


def sensitivity_allocator(options: Mapping[str, Any] | None = None) -> SensitivityAllocator:
    """A :class:`SensitivityAllocator` from a dict of its keyword arguments (what configs pass as
    ``sensitivity:``); an unknown key is a ``ValueError`` naming it and the accepted ones."""
    options = dict(options or {})
    accepted = [name for name in inspect.signature(SensitivityAllocator.__init__).parameters if name != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sensitivity: unknown option(s) {unknown}; accepted keys: {', '.join(accepted)}.")
    return SensitivityAllocator(**options)
