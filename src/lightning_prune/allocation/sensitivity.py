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

import contextlib
import functools
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..structure import DependencyGraph, FlopsModel
from ..structure.tracing import preserved_state
from .evaluation import LOCAL, AccuracyEvaluator, Collective, RecordedPasses, _progress


@dataclass
class SensitivityStep:
    """What one analysis round measured and chose.

    ``trials[name] = {"k": channels masked, "delta_flops": ΔF_l, "accuracy": accuracy with them masked}``;
    ``chosen`` are the selected groups in selection order and ``removed[name]`` the channels they lose (after
    trimming to a FLOPs budget, if one was given)."""

    #: accuracy of the unmasked network (``None`` with ``baseline=False``: the ranking never needs it)
    baseline: float | None
    trials: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen: list[str] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    flops_before: int | None = None
    flops_after: int | None = None
    #: image-forwards this round cost on this rank (0 when ``evaluate`` does not count them)
    images: int = 0
    #: the same in full-forward equivalents (``reuse_prefix`` computes only part of each trial's forward)
    forward_equivalents: float = 0.0


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


MODES = ("exact", "fast")
SHARDS = ("groups", "data")
BASELINE = ""  # the unmasked network, evaluated beside the trials

#: [measured] fast mode's default ``lazy_margin``, in standard errors of the best fresh count (see
#: :func:`lazy_margin_count`). A stale estimate can rise between rounds (digits ResNet-20/56, 144 images: 18-23 % of
#: the trials rose, by up to 34 images), and near the top several trials are within an image or two. Replayed on
#: exact mode's own measurements, one plain binomial standard error picked exact mode's group in 87 % / 98 % of
#: the rounds; two plus-four standard errors in every round (measuring 83 % / 68 % of the trials).
LAZY_STANDARD_ERRORS = 2.0


def lazy_margin_count(correct: float, total: int) -> float:
    """:data:`LAZY_STANDARD_ERRORS` plus-four (Agresti-Coull) standard errors of a count of ``correct`` images of
    ``total``. Unlike the plain binomial error it does not vanish at all (or none) correct, where ties decide:
    on digits the best trials are often all correct, and a stale estimate one image lower still catches up."""
    share = (correct + 2.0) / (total + 4.0)
    return LAZY_STANDARD_ERRORS * total * math.sqrt(share * (1.0 - share) / (total + 4.0))


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an integer >= {minimum}, got {value!r}.")


class SensitivityAllocator:
    """Per-group pruning amounts from FLOP-normalized sensitivity analysis (paper 2, steps a–e).

    Args:
        prune_multiple: ``m`` in ``k_l = int(m · max ΔF / ΔF_l)`` (default 0.8, the authors' value). Each trial
            removes about ``m · max ΔF`` FLOPs; ``k_l`` is clipped to what the group can lose, rounded down to a
            multiple of the group's ``divisions`` and at least ``divisions``.
        min_width_fraction: a group is eligible while it would keep at least ``ceil(min_width_fraction ·
            original_size)`` channels (and at least ``min_size``) after losing ``k_l`` (default 0.125).
        num_groups: groups pruned per round (the authors' ``num_layers``; default 1).
        progress: show a tqdm progress bar over the rounds (rank zero) with an ETA.
        recalibrate_batches: re-estimate BatchNorm statistics on this many training batches before the baseline
            and before each trial (the ``recalibrate`` callable of :meth:`step`; default 0 = no, as in the
            paper). Masked channels shift the inputs of the next BatchNorm; with stale statistics every trial of
            a BatchNorm network can fall to chance accuracy and the ranking becomes noise. [design]
        mode: ``"exact"`` (default): the paper's procedure; every round evaluates every eligible group and the
            decisions are those of the straightforward loop. ``"fast"``: an opt-in approximation: between full
            refreshes (every ``refresh_every`` rounds) the trials are evaluated *lazily*: each group's last measured
            accuracy serves as an optimistic estimate (pruning the network further usually makes a trial less
            accurate), groups are re-measured in the order of those estimates (first every group within the margin
            of the best estimate, then ``top_k`` at a time), and the round
            stops once the ``num_groups`` best fresh measurements beat the best estimate not re-measured by
            ``lazy_margin`` (lazy greedy, Minoux 1978: the exact choice whenever the estimates are upper bounds;
            the margin absorbs validation noise, under which they are not always). Scores of
            data-driven criteria are reused for ``rescore_every`` rounds and FLOPs are predicted instead of
            re-counted. [design]
        early_exit: stop a trial's validation pass once even all remaining images being correct could not bring
            it among the ``num_groups`` best trials measured so far (default True; never changes a decision: the
            bound is exact). The trial's recorded ``accuracy`` is then that upper bound (``"exact": False``).
        shard: under DDP, how the ranks split a round: ``"groups"`` (default; each rank evaluates every
            ``world_size``-th trial on the whole split, the results are gathered) or ``"data"`` (every rank runs
            every trial on its share of the split, the correct counts are summed). BatchNorm re-estimation
            (``recalibrate_batches``) always uses ``"data"`` (its statistics are all-reduced per trial). Either
            way every rank decides on the same integers, with rank zero's BatchNorm buffers.
        eval_batch_size: re-batch the validation split into batches of this size for the trials (default: the
            loader's batches).
        max_rounds: stop after this many rounds (``None``: until the target); the event reports what was reached
            and ``target_met`` is False if it falls short.
        time_budget_s: stop starting new rounds after this many seconds of the event (``None``: no limit).
        rescore_every: re-score data-driven criteria every this many rounds (default 1 in exact mode: every
            round, as the paper; ``refresh_every`` in fast mode; weight criteria are re-scored only for groups
            whose tensors changed, always exact). Between re-scorings the stale scores are sliced to the surviving
            channels.
        lazy_margin: ``mode="fast"``: how far (in accuracy, e.g. ``0.02``) the best fresh measurements must lead
            the best estimate left before a lazy round stops. Default ``None``: two plus-four standard errors of
            the best fresh accuracy on the validation split, ``2 sqrt(p (1 - p) / (n + 4))`` with
            ``p = (correct + 2) / (n + 4)`` (:func:`lazy_margin_count`; 0 when ``evaluate`` does not count
            images). Replayed on exact mode's own measurements on digits ResNet-20/56 (144 images), the lazy
            rounds then pick exact mode's group in every round, measuring 83 % / 68 % of the trials
            (docs/benchmarks/sensitivity_scale.md). [measured]
        top_k: ``mode="fast"``: groups re-measured together in a lazy round (default ``4 · num_groups``); a round
            measures at least this many (more in its first chunk when more estimates are within the margin of the
            best), more while a not re-measured group's estimate could still beat them.
        refresh_every: ``mode="fast"``: a full round (every eligible group) every this many rounds (default 4).
        baseline: also evaluate the unmasked network each round (default True). It is for reporting only: the
            ranking compares the trials' correct counts, so ``False`` saves one evaluation per round and never
            changes a decision (``SensitivityStep.baseline`` is then ``None``). With ``reuse_prefix`` the unmasked
            pass is what the trials replay, so the baseline is always measured and reported (it costs nothing).
        reuse_prefix: run the trials batch by batch after one unmasked pass, replaying every layer call before a
            trial's first masked layer instead of computing it (:class:`~lightning_prune.structure.replay.
            PrefixReplay`; default True). The outputs are bit-identical, so the decisions are those of full passes;
            on ResNets a trial then computes about half of the FLOPs. Used with an :class:`AccuracyEvaluator` and
            without ``recalibrate_batches`` (re-estimated statistics change the prefix too).
        replay_mb: memory for the recorded layer outputs of one validation batch, on the model's device (default
            ``None``: a quarter of the memory free there at the event); a prefix longer than that is replayed only
            up to the budget (still exact, less saved, with a warning). ResNet-50 at 224² records about 122 MB
            per image in float32 (half under 16-bit autocast): size ``eval_batch_size`` to fit. In
            ``mode="fast"`` a lazy round also keeps the recorded batches, up to the same budget in all, for its
            later chunks, which then do not run the unmasked network again (so up to twice ``replay_mb`` is held
            while a batch that was not kept is replayed).

    Deterministic: groups are tried in module order and ties in accuracy are broken by group name. ``evaluate``
    must be deterministic too (fixed validation split, no augmentation); it is called in eval mode under
    ``torch.no_grad()``, with the model's train/eval flags and buffers restored afterwards. Pass an
    :class:`~lightning_prune.allocation.evaluation.AccuracyEvaluator` for early exit and image counts; a plain
    ``evaluate() -> float`` is evaluated fully every time.

    After :meth:`step`, ``last_step`` holds the measurements (:class:`SensitivityStep`).

    [design] choices beyond the paper: a group whose channels cost no FLOPs (``ΔF_l = 0``) is never eligible;
    the baseline accuracy is measured once per round for reporting (the ranking only needs the trials;
    ``baseline=False`` skips it);
    :meth:`plan_to_flops` trims the last round's removals to the FLOPs still missing, so the target is reached
    with an overshoot below one ``divisions`` step of one group instead of a whole ``k_l``; trials run in the
    order of the previous round's ranking (best first), which only makes early exits earlier.
    """

    def __init__(self, prune_multiple: float = 0.8, min_width_fraction: float = 0.125, num_groups: int = 1,
                 progress: bool = True, recalibrate_batches: int = 0, mode: str = "exact", early_exit: bool = True,
                 shard: str = "groups", eval_batch_size: int | None = None, max_rounds: int | None = None,
                 time_budget_s: float | None = None, rescore_every: int | None = None, top_k: int | None = None,
                 refresh_every: int = 4, baseline: bool = True, reuse_prefix: bool = True,
                 replay_mb: float | None = None, lazy_margin: float | None = None):
        if isinstance(prune_multiple, bool) or not isinstance(prune_multiple, (int, float)) or prune_multiple <= 0:
            raise ValueError(f"prune_multiple must be a number > 0, got {prune_multiple!r}.")
        if (isinstance(min_width_fraction, bool) or not isinstance(min_width_fraction, (int, float))
                or not 0.0 <= min_width_fraction < 1.0):
            raise ValueError(f"min_width_fraction must be a number in [0, 1), got {min_width_fraction!r}.")
        _check_int("num_groups", num_groups, 1)
        _check_int("recalibrate_batches", recalibrate_batches, 0)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {', '.join(map(repr, SHARDS))}, got {shard!r}.")
        _check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
        _check_int("max_rounds", max_rounds, 0, allow_none=True)
        if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float))
                                          or time_budget_s <= 0):
            raise ValueError(f"time_budget_s must be None or a number of seconds > 0, got {time_budget_s!r}.")
        _check_int("rescore_every", rescore_every, 1, allow_none=True)
        _check_int("top_k", top_k, 1, allow_none=True)
        _check_int("refresh_every", refresh_every, 1)
        if not isinstance(baseline, bool):
            raise ValueError(f"baseline must be True or False, got {baseline!r}.")
        if lazy_margin is not None and (isinstance(lazy_margin, bool) or not isinstance(lazy_margin, (int, float))
                                        or not 0.0 <= lazy_margin <= 1.0):
            raise ValueError(f"lazy_margin must be None or an accuracy in [0, 1], got {lazy_margin!r}.")
        if not isinstance(reuse_prefix, bool):
            raise ValueError(f"reuse_prefix must be True or False, got {reuse_prefix!r}.")
        if replay_mb is not None and (isinstance(replay_mb, bool) or not isinstance(replay_mb, (int, float))
                                      or replay_mb < 0):
            raise ValueError(f"replay_mb must be None or a number of megabytes >= 0, got {replay_mb!r}.")
        self.prune_multiple = float(prune_multiple)
        self.min_width_fraction = float(min_width_fraction)
        self.num_groups = num_groups
        self.progress = bool(progress)
        self.recalibrate_batches = recalibrate_batches
        self.mode, self.early_exit, self.shard = mode, bool(early_exit), shard
        self.eval_batch_size, self.max_rounds, self.time_budget_s = eval_batch_size, max_rounds, time_budget_s
        self.rescore_every = rescore_every if rescore_every is not None else (refresh_every if mode == "fast" else 1)
        self.top_k = max(top_k if top_k is not None else 4 * num_groups, num_groups)
        self.refresh_every = refresh_every
        self.baseline = bool(baseline)
        self.reuse_prefix, self.replay_mb = reuse_prefix, replay_mb
        self.lazy_margin = None if lazy_margin is None else float(lazy_margin)
        self.last_step: SensitivityStep | None = None
        self._order: list[str] = []  # the previous round's ranking, best first
        self._estimates: dict[str, float] = {}  # every group's last measured ranking key (fast mode's lazy rounds)

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
        collective: Collective = LOCAL,
        candidates: Iterable[str] | None = None,
        lazy: bool = False,
    ) -> dict[str, list[int]]:
        """One analysis round: returns ``{group: indices to remove}`` for the ``num_groups`` least sensitive
        groups (empty when no group is eligible any more). Nothing is pruned; the model is left unchanged.

        Args:
            graph: the dependency graph of the model (at its current widths).
            scores: one score per current channel of every eligible group (higher = keep).
            evaluate: ``evaluate() -> float``, accuracy (higher = better) of ``graph.model`` on a held-out
                validation split; never the test set. An :class:`AccuracyEvaluator` enables early exit.
            flops_model: a :class:`FlopsModel` built at the current widths (built here when omitted).
            flops_budget: optional FLOPs still to remove; the chosen groups' removals are trimmed (keeping the
                lowest-scored channels) so that the predicted removal does not exceed the budget by more than
                one ``divisions`` step of one group. Used by :meth:`plan_to_flops` to land on its target.
            recalibrate: called (in the masked state) before the baseline and each trial is evaluated, e.g.
                ``lambda: recalibrate_batchnorm(model, train_batches, num_batches=4)``; the BatchNorm statistics
                are restored afterwards.
            collective: the DDP ranks (see ``shard``); default a single process.
            candidates: evaluate only these eligible groups; default all.
            lazy: evaluate lazily against the groups' last measurements (``mode="fast"`` between refreshes; see
                ``mode``). Groups never measured before are measured first.
        """
        if flops_model is None:
            flops_model = FlopsModel(graph, graph.example_inputs)
        stale = getattr(flops_model, "_sizes", None)
        if stale is not None and stale != graph.widths():
            raise ValueError("flops_model was built at other widths than the graph's current ones; rebuild it "
                             "with FlopsModel(graph, example_inputs) after every prune.")
        sizes = self.trial_sizes(graph, flops_model)
        if candidates is not None:
            wanted = set(candidates)
            sizes = {name: k for name, k in sizes.items() if name in wanted} or sizes
        by_name = {g.name: g for g in graph.groups}
        trial_removals = {}
        for name, k in sizes.items():
            if name not in scores:
                raise ValueError(f"scores: no scores for group {name!r}.")
            trial_removals[name] = by_name[name].lowest(scores[name], k)

        images_before = getattr(evaluate, "images", 0)
        equivalents_before = getattr(evaluate, "forward_equivalents", 0.0)
        runner = _TrialRunner(self, graph, evaluate, recalibrate, collective)
        if lazy:
            measured = self._run_lazily(runner, trial_removals)
        else:
            measured = runner.run(trial_removals, self._trial_order(trial_removals))
        self._estimates.update({name: key for name, key in runner.key.items() if name != BASELINE})
        result = SensitivityStep(baseline=measured.pop(BASELINE)[0] if BASELINE in measured else None)
        for name in trial_removals:  # module order, as before
            if name not in measured:
                continue  # a lazy round did not need it
            accuracy, exact = measured[name]
            result.trials[name] = {"k": sizes[name], "delta_flops": float(flops_model.delta_per_channel(name)),
                                   "accuracy": accuracy}
            if not exact:
                result.trials[name]["exact"] = False
        result.images = int(getattr(evaluate, "images", 0) - images_before)
        result.forward_equivalents = float(getattr(evaluate, "forward_equivalents", 0.0) - equivalents_before)
        ranking = sorted(result.trials, key=lambda n: (-runner.key[n], n))
        self._order = ranking
        removals = self._trimmed(ranking[: self.num_groups], trial_removals, scores, by_name, flops_model,
                                 flops_budget)
        result.chosen = list(removals)
        result.removed = {name: len(ix) for name, ix in removals.items()}
        self.last_step = result
        return removals

    def _run_lazily(self, runner: "_TrialRunner",
                    trial_removals: Mapping[str, list[int]]) -> dict[str, tuple[float, bool]]:
        """A lazy round: groups in the order of their last measurement (never measured: first), the first chunk
        :meth:`_first_chunk` of them, then ``top_k`` at a time, until the ``num_groups`` best fresh keys lead the
        best estimate left by the margin. ``runner.key`` ends with every measured key."""
        estimate = lambda name: self._estimates.get(name, math.inf)
        pending = sorted(trial_removals, key=lambda n: (-estimate(n), n))
        measured: dict[str, tuple[float, bool]] = {}
        keys: dict[str, float] = {}
        size = self._first_chunk(runner, pending, estimate)
        recorded = RecordedPasses() if runner.replays else None  # the chunks share the unchanged model's passes
        while pending:
            chunk, pending, size = pending[:size], pending[size:], self.top_k
            result = runner.run({n: trial_removals[n] for n in chunk}, chunk, recorded)
            for name in result:  # every chunk reports the baseline: the first one is kept
                if name != BASELINE or name not in measured:
                    measured[name], keys[name] = result[name], runner.key[name]
            fresh = sorted((k for n, k in keys.items() if n != BASELINE), reverse=True)
            if len(fresh) < self.num_groups:
                continue
            chosen = fresh[self.num_groups - 1]
            if not pending or chosen >= estimate(pending[0]) + self._margin(runner, chosen):
                break
        runner.key = keys
        return measured

    def _first_chunk(self, runner: "_TrialRunner", pending: list[str], estimate: Callable[[str], float]) -> int:
        """How many groups a lazy round measures first: ``top_k``, or every group whose estimate is within the
        margin of the ``num_groups``-th best estimate if they are more. The round would re-measure most of them
        chunk by chunk anyway, and where the unmasked network's recorded passes do not fit the replay budget
        (:class:`~lightning_prune.allocation.evaluation.RecordedPasses`), every further chunk runs it again.
        [measured] Digits ResNet-20/56 with no passes kept: 1.06x / 1.33x fewer forward-equivalents than exact
        mode (with its decisions), against 0.98x / 1.21x with ``top_k`` chunks only."""
        if not pending:
            return self.top_k
        bar = estimate(pending[min(self.num_groups, len(pending)) - 1])
        bar -= self._margin(runner, bar)
        return max(self.top_k, sum(estimate(name) >= bar for name in pending))

    def _margin(self, runner: "_TrialRunner", key: float) -> float:
        """``lazy_margin`` in ranking-key units (correct counts when counting, else accuracies)."""
        total = runner.evaluate.total if runner.counting else None
        if self.lazy_margin is not None:
            return self.lazy_margin * (total if total else 1.0)
        if not total:
            return 0.0
        return lazy_margin_count(min(max(key, 0.0), total), total)

    def _trial_order(self, trial_removals: Mapping[str, Any]) -> list[str]:
        """The previous ranking first (so that the early-exit threshold is high from the start), then module
        order. The order never changes a decision."""
        known = [n for n in self._order if n in trial_removals]
        return known + [n for n in trial_removals if n not in set(known)]

    def _trimmed(self, chosen: list[str], trial_removals: Mapping[str, list[int]], scores: Mapping[str, torch.Tensor],
                 by_name: Mapping[str, Any], flops_model: FlopsModel, flops_budget: float | None) -> dict[str, list[int]]:
        """Step e: the chosen groups' removals, the last ones trimmed to the FLOPs budget."""
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
        return removals

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


def _ranked(correct: int, seen: int, total: int) -> tuple[float, float, bool]:
    """``(ranking key, accuracy, exact)`` of a counted pass; an exited pass (``seen < total``) is ranked and
    reported by the upper bound that let it stop (every unseen image correct)."""
    bound = correct + total - seen
    return float(bound), (bound / total if total else 0.0), seen >= total


class _TrialRunner:
    """Evaluates the baseline and the masked trials of one round, sharded over the collective's ranks, with
    early exit; every rank ends with the same ``{name: (accuracy, exact)}`` and integer ranking keys.

    All trials see rank zero's BatchNorm buffers (synchronized inside ``preserved_state``, which restores each
    rank's own afterwards), so the numbers do not depend on which rank measured them."""

    def __init__(self, allocator: SensitivityAllocator, graph: DependencyGraph, evaluate: Callable[[], float],
                 recalibrate: Callable[[], Any] | None, collective: Collective):
        self.allocator, self.graph, self.evaluate, self.recalibrate = allocator, graph, evaluate, recalibrate
        self.collective = collective
        self.counting = isinstance(evaluate, AccuracyEvaluator)
        sharded_data = self.counting and evaluate.shard_data
        # Re-estimation all-reduces statistics in every trial: every rank must run every trial then.
        self.split_groups = (collective.is_distributed and not sharded_data and recalibrate is None
                             and allocator.shard == "groups")
        self.key: dict[str, float] = {}

    @property
    def replays(self) -> bool:
        """Whether the trials replay the unchanged model's recorded prefix (:meth:`_run_replayed`)."""
        return self.counting and self.recalibrate is None and self.allocator.reuse_prefix

    def run(self, trial_removals: Mapping[str, list[int]], order: list[str],
            recorded: RecordedPasses | None = None) -> dict[str, tuple[float, bool]]:
        """Measure the trials (``recorded``: the unchanged model's passes kept across the calls of one round)."""
        if self.replays:
            return self._run_replayed(trial_removals, order, recorded)
        items = order + ([BASELINE] if self.allocator.baseline else [])
        mine = self.collective.shard(items) if self.split_groups else items
        local: dict[str, tuple[float, float, bool]] = {}
        with self._measuring():
            for name in _progress(mine, self._show_progress, unit="trial"):
                removal = {name: trial_removals[name]} if name != BASELINE else {}
                with self.graph.masked(removal):
                    if self.recalibrate is not None:
                        self.recalibrate()
                    local[name] = self._measure(name, local)
        return self._publish(self._merged(local))

    def _run_replayed(self, trial_removals: Mapping[str, list[int]], order: list[str],
                      recorded: RecordedPasses | None) -> dict[str, tuple[float, bool]]:
        """Every trial of this rank batch by batch after one unmasked pass, the common prefix replayed
        (:meth:`AccuracyEvaluator.correct_trials`); the same counts as :meth:`run`'s separate passes."""
        mine = self.collective.shard(order) if self.split_groups else list(order)
        targets = {name: self.graph.mask_targets({name: trial_removals[name]}) for name in mine}
        trials = {name: functools.partial(self.graph.masked, {name: trial_removals[name]}, targets[name])
                  for name in mine}
        changed = {name: [weight for weight, _ in targets[name]] for name in mine}
        keep = self.allocator.num_groups if self.allocator.early_exit else None
        with self._measuring():
            baseline, counts = self.evaluate.correct_trials(trials, changed, keep=keep,
                                                            replay_mb=self.allocator.replay_mb,
                                                            progress=self._show_progress, recorded=recorded)
        total = self.evaluate.total
        merged = self._merged({name: _ranked(correct, seen, total) for name, (correct, seen) in counts.items()})
        merged[BASELINE] = _ranked(baseline, total, total)
        return self._publish(merged)

    @contextlib.contextmanager
    def _measuring(self) -> Iterator[None]:
        """Eval mode, no autograd and rank zero's buffers for the trials; every rank's own state back afterwards."""
        model = self.graph.model
        with preserved_state(model), torch.no_grad():
            model.eval()
            self.collective.sync_buffers(model)
            yield

    def _merged(self, local: dict[str, tuple[float, float, bool]]) -> dict[str, tuple[float, float, bool]]:
        """This rank's measurements, with every other rank's when the trials were split over them."""
        if not self.split_groups:
            return local
        merged: dict[str, tuple[float, float, bool]] = {}
        for part in self.collective.gather(local):
            merged.update(part)
        return merged

    def _publish(self, merged: Mapping[str, tuple[float, float, bool]]) -> dict[str, tuple[float, bool]]:
        """Keep the ranking keys in ``self.key``; return ``{name: (accuracy, exact)}``."""
        self.key = {name: value[0] for name, value in merged.items()}
        return {name: (value[1], value[2]) for name, value in merged.items()}

    @property
    def _show_progress(self) -> bool:
        return self.allocator.progress and self.collective.rank == 0

    def _measure(self, name: str, done: Mapping[str, tuple[float, float, bool]]) -> tuple[float, float, bool]:
        """``(ranking key, accuracy, exact)``: the key is the integer correct count when counting."""
        if not self.counting:
            accuracy = float(self.evaluate())
            return accuracy, accuracy, True
        threshold = self._threshold(done) if name != BASELINE else None
        correct, seen = self.evaluate.correct(at_least=threshold)
        return _ranked(correct, seen, self.evaluate.total)

    def _threshold(self, done: Mapping[str, tuple[float, float, bool]]) -> int | None:
        """The ``num_groups``-th best exact correct count among this rank's finished trials (a trial that cannot
        reach it cannot be chosen: the global one is at least as high)."""
        if not self.allocator.early_exit:
            return None
        exact = sorted((v[0] for n, v in done.items() if n != BASELINE and v[2]), reverse=True)
        if len(exact) < self.allocator.num_groups:
            return None
        return int(exact[self.allocator.num_groups - 1])

