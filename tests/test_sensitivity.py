"""FLOP-normalized sensitivity analysis (paper 2) on a network with a known critical and a known redundant group.

Data: 4 classes; sample of class c has a bright input plane c. The network is built by hand:

- group ``a`` (conv a, 4 channels): channel c copies input plane c. Every channel carries one class's signal,
  so removing any of them makes that class unrecognisable (about -25 % accuracy): critical.
- group ``b`` (conv b, 8 channels): channels c and c+4 are both copies of ``a``'s channel c (duplicates), and the
  head reads each with weight 0.5. Removing one copy of a pair changes nothing: redundant.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_prune.allocation import SensitivityAllocator
from lightning_prune.criteria import get
from lightning_prune.structure import DependencyGraph, FlopsModel, count_flops

CLASSES, SIDE = 4, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(CLASSES, CLASSES, 3, padding=1, bias=False)
        self.b = nn.Conv2d(CLASSES, 2 * CLASSES, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * CLASSES, CLASSES, bias=False)
        with torch.no_grad():
            for m in (self.a, self.b, self.head):
                m.weight.zero_()
            for c in range(CLASSES):
                self.a.weight[c, c, 1, 1] = 1.0
                self.b.weight[c, c, 1, 1] = 1.0
                self.b.weight[c + CLASSES, c, 1, 1] = 1.0
                self.head.weight[c, c] = 0.5
                self.head.weight[c, c + CLASSES] = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.head(self.pool(x).flatten(1))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.3 * torch.randn(n, CLASSES, SIDE, SIDE, generator=g)
    x[torch.arange(n), y] += 1.0
    return x, y


@pytest.fixture
def setup():
    model = Net().eval()
    x_val, y_val = _data(256, seed=1)  # held-out validation split (not the data the scores come from)

    def evaluate() -> float:
        return float((model(x_val).argmax(1) == y_val).float().mean())

    graph = DependencyGraph(model, x_val[:2])
    l2 = get("l2")

    def scores_fn():
        return {g.name: l2.score(g) for g in graph.groups}

    return model, graph, evaluate, scores_fn, x_val[:2]


def test_groups_and_baseline(setup):
    model, graph, evaluate, _, _ = setup
    assert [(g.name, g.size) for g in graph.groups] == [("a", 4), ("b", 8)]
    assert evaluate() > 0.98


def test_trial_sizes_follow_flop_normalisation(setup):
    _, graph, _, _, x = setup
    fm = FlopsModel(graph, x)
    da, db = fm.delta_per_channel("a"), fm.delta_per_channel("b")
    assert da > db > 0
    sizes = SensitivityAllocator(progress=False).trial_sizes(graph, fm)
    # k_l = int(0.8 * max dF / dF_l), at least one channel
    assert sizes == {"a": max(1, int(0.8 * da / da)), "b": max(1, int(0.8 * da / db))}
    assert sizes["a"] == 1 and sizes["b"] == 2
    # min_width_fraction 0.75: 'a' may keep no fewer than 3 of 4, 'b' 6 of 8 (so k_b is clipped to 2)
    sizes = SensitivityAllocator(min_width_fraction=0.75, prune_multiple=5.0, progress=False).trial_sizes(graph, fm)
    assert sizes == {"a": 1, "b": 2}
    assert SensitivityAllocator(min_width_fraction=0.99, progress=False).trial_sizes(graph, fm) == {}


def test_step_spares_the_critical_group_and_prunes_the_redundant_one(setup):
    model, graph, evaluate, scores_fn, x = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    allocator = SensitivityAllocator(progress=True)
    removals = allocator.step(graph, scores_fn(), evaluate, FlopsModel(graph, x))
    assert list(removals) == ["b"] and len(removals["b"]) == 2
    trials = allocator.last_step.trials
    baseline = allocator.last_step.baseline
    assert baseline - trials["a"]["accuracy"] > 0.15  # one class destroyed
    assert trials["b"]["accuracy"] == baseline  # a duplicate removed: exactly nothing changes
    # the step only measured: the model is unchanged and in its original mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training
    graph.prune_groups(removals)
    assert evaluate() == baseline


def test_plan_to_flops_reaches_target_within_one_group_step(setup):
    model, graph, evaluate, scores_fn, x = setup
    original = count_flops(model, x)
    per_channel_b = FlopsModel(graph, x).delta_per_channel("b")
    baseline = evaluate()
    calls = []
    result = SensitivityAllocator(progress=False).plan_to_flops(
        graph, scores_fn, evaluate, x, 0.25, original_flops=original, on_step=lambda step, g: calls.append(g.widths()))
    assert result.reached, result.message
    measured = 1 - count_flops(model, x) / original
    assert result.reduction == pytest.approx(measured)
    assert 0.25 <= measured <= 0.25 + per_channel_b / original + 1e-9  # overshoot below one channel of 'b'
    # everything came from the redundant group; the critical group is intact and accuracy unchanged
    assert graph.widths()["a"] == 4 and graph.widths()["b"] < 8
    assert set(result.removed) == {"b"}
    assert evaluate() == baseline
    assert len(calls) == len(result.steps) >= 1
    assert all(step.chosen == ["b"] for step in result.steps)


def test_plan_to_flops_reports_an_unreachable_target(setup):
    model, graph, evaluate, scores_fn, x = setup
    original = count_flops(model, x)
    allocator = SensitivityAllocator(min_width_fraction=0.5, progress=False)
    with pytest.warns(RuntimeWarning, match="not reached"):
        result = allocator.plan_to_flops(graph, scores_fn, evaluate, x, 0.9, original_flops=original)
    assert not result.reached and "minimum width" in result.message
    assert graph.widths() == {"a": 2, "b": 4}  # every group at its floor
    assert result.reduction == pytest.approx(1 - count_flops(model, x) / original)
    # a repeated call on the pruned graph continues from there and defaults original FLOPs to the original widths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = allocator.plan_to_flops(graph, scores_fn, evaluate, x, 0.9)
    assert again.steps == [] and again.original_flops == pytest.approx(original, rel=0.02)  # pooling is only approximated


def test_argument_errors():
    with pytest.raises(ValueError, match="prune_multiple"):
        SensitivityAllocator(prune_multiple=0)
    with pytest.raises(ValueError, match="min_width_fraction"):
        SensitivityAllocator(min_width_fraction=1.0)
    with pytest.raises(ValueError, match="num_groups"):
        SensitivityAllocator(num_groups=0)


class GroupedNet(nn.Module):
    """A grouped convolution couples its input channels in two chunks (``divisions == 2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_channel_target_trims_grouped_conv_steps_symmetrically():
    import lightning_prune as lp

    torch.manual_seed(0)
    model = GroupedNet().eval()
    x = torch.randn(32, 3, 6, 6)
    y = torch.randint(0, 4, (32,))
    graph_before = DependencyGraph(model, x[:2])
    assert any(g.divisions == 2 for g in graph_before.groups)
    # m=4 makes every trial step remove more than the 25 % channel target allows, so the step must be trimmed.
    report = lp.prune(model, x[:2], criterion="l1", amount=0.25, allocation="sensitivity",
                      val_dataloader=[(x, y)], sensitivity={"progress": False, "prune_multiple": 4.0})
    widths = report.widths_after
    assert sum(report.removed.values()) == 4  # 25 % of the 16 prunable channels, not a whole oversized step
    for group in DependencyGraph(model, x[:2]).groups:
        assert group.size % max(group.divisions, 1) == 0
    model.train()(x[:4]).sum().backward()
    assert widths


# -- exact mode: identical decisions to the straightforward procedure --------------------------------------------
def _reference_step(graph, scores, accuracy, allocator, flops_model):
    """The straightforward round: every eligible group masked in module order, the whole split each time, the
    ``num_groups`` smallest drops (ties by name)."""
    sizes = allocator.trial_sizes(graph, flops_model)
    by_name = {g.name: g for g in graph.groups}
    baseline = accuracy()
    drops = {}
    for name, k in sizes.items():
        with graph.masked({name: by_name[name].lowest(scores[name], k)}):
            drops[name] = baseline - accuracy()
    chosen = sorted(drops, key=lambda n: (drops[n], n))[: allocator.num_groups]
    return {name: by_name[name].lowest(scores[name], sizes[name]) for name in chosen}


@pytest.mark.parametrize("num_groups", [1, 2])
def test_exact_mode_with_early_exit_decides_like_the_straightforward_procedure(trained_digits, num_groups):
    import copy

    from lightning_prune.allocation import AccuracyEvaluator

    model = copy.deepcopy(trained_digits[0])
    val = trained_digits[1]
    graph = DependencyGraph(model, val[0][0][:2])
    evaluator = AccuracyEvaluator(model, val)
    full = sum(len(y) for _, y in val)

    def plain_accuracy() -> float:
        with torch.no_grad():
            return sum(int((model(x).argmax(1) == y).sum()) for x, y in val) / full

    allocator = SensitivityAllocator(num_groups=num_groups, prune_multiple=2.0, progress=False)
    l1 = get("l1")
    exited = 0
    for _ in range(6):
        scores = {g.name: l1.score(g) for g in graph.groups}
        flops_model = FlopsModel(graph, val[0][0][:2])
        expected = _reference_step(graph, scores, plain_accuracy, allocator, flops_model)
        images = evaluator.images
        removals = allocator.step(graph, scores, evaluator, flops_model)
        assert removals == expected
        step = allocator.last_step
        assert step.images == evaluator.images - images <= (len(step.trials) + 1) * full
        for trial in step.trials.values():
            exited += trial.get("exact", True) is False
        if not removals:
            break
        graph.prune_groups(removals)
    assert exited > 0  # the bound did stop some trials early, without changing a decision


def test_early_exit_bound_is_an_upper_bound(trained_digits):
    from lightning_prune.allocation import AccuracyEvaluator

    model, val = trained_digits
    evaluator = AccuracyEvaluator(model, val)
    correct, seen = evaluator.correct()
    assert seen == evaluator.total == sum(len(y) for _, y in val)
    assert evaluator() == correct / seen
    partial, partial_seen = evaluator.correct(at_least=correct + 1)  # unreachable: stops before the end
    assert partial_seen < seen and partial + (seen - partial_seen) < correct + 1
    assert partial + (seen - partial_seen) >= correct


def test_budgets_stop_cleanly_and_report_it(trained_digits):
    import copy

    import lightning_prune as lp

    model = copy.deepcopy(trained_digits[0])
    val = trained_digits[1]
    with pytest.warns(UserWarning, match="max_rounds=2"):
        report = lp.prune(model, val[0][0][:2], criterion="l1", flops_reduction=0.5, allocation="sensitivity",
                          val_dataloader=val, sensitivity={"progress": False, "max_rounds": 2})
    assert len(report.sensitivity_steps) == 2 and not report.target_met
    assert 0 < report.flops_reduction < 0.5
    model(val[0][0])  # the pruned model runs


def test_weight_scores_are_recomputed_only_for_changed_groups(trained_digits):
    import copy

    from lightning_prune.allocation.strategies import AllocationContext, _ScoreCache

    model = copy.deepcopy(trained_digits[0])
    graph = DependencyGraph(model, trained_digits[1][0][0][:2])
    l1 = get("l1")
    ctx = AllocationContext(graph=graph, criterion=l1, target=0.5, target_kind="flops", round_to=None,
                            max_group_sparsity=0.9, original_flops=1.0, score=lambda: {}, apply=lambda r: None,
                            exclude=lambda r: False)
    cache = _ScoreCache(ctx, rescore_every=1)
    first = cache.get()
    assert cache.computed == len(graph.groups)
    assert cache.get().keys() == first.keys() and cache.computed == len(graph.groups)  # nothing changed
    name = graph.groups[1].name
    graph.prune_groups({name: [0, 1]})
    again = cache.get()
    # the pruned group and its neighbours (whose tensors lost input channels) were rescored, not the others
    assert len(graph.groups) < cache.computed < 2 * len(graph.groups)
    assert all(torch.equal(again[g.name], l1.score(g)) for g in graph.groups)


# -- fast mode: opt-in, fewer trials, exact when every round is a full refresh -------------------------------------
def test_fast_mode_is_opt_in():
    from lightning_prune.allocation import sensitivity_allocator

    assert SensitivityAllocator().mode == "exact" and sensitivity_allocator({}).mode == "exact"
    exact = SensitivityAllocator()
    assert exact.rescore_every == 1  # exact mode re-scores data-driven criteria every round, as the paper
    fast = SensitivityAllocator(mode="fast", num_groups=2)
    assert (fast.top_k, fast.refresh_every, fast.rescore_every) == (8, 4, 4)  # the documented defaults


def test_the_default_lazy_margin_does_not_vanish_when_every_image_is_correct():
    """Fast mode's default margin: two plus-four standard errors of the best fresh count. With all 144 images
    correct the plain binomial error is 0, so an estimate one image lower that catches up (a tie, decided by name)
    was not re-measured; the plus-four error keeps a margin of about three images there."""
    from lightning_prune.allocation.sensitivity import LAZY_STANDARD_ERRORS, lazy_margin_count

    assert LAZY_STANDARD_ERRORS == 2.0
    share = 146 / 148
    assert lazy_margin_count(144, 144) == pytest.approx(2 * 144 * (share * (1 - share) / 148) ** 0.5)
    assert 2.0 < lazy_margin_count(144, 144) < 3.0
    assert lazy_margin_count(0, 144) == pytest.approx(lazy_margin_count(144, 144))
    assert lazy_margin_count(72, 144) == pytest.approx(2 * 144 * (0.25 / 148) ** 0.5)  # the widest, mid-range
    assert lazy_margin_count(72, 144) > lazy_margin_count(140, 144) > lazy_margin_count(144, 144)


@pytest.mark.parametrize("options, match", [
    ({"mode": "quick"}, r"mode must be one of 'exact', 'fast', got 'quick'"),
    ({"shard": "ranks"}, r"shard must be one of 'groups', 'data', got 'ranks'"),
    ({"top_k": 0}, r"top_k must be None or an integer >= 1, got 0"),
    ({"top_k": 2.5}, r"top_k must be None or an integer >= 1, got 2.5"),
    ({"refresh_every": 0}, r"refresh_every must be an integer >= 1, got 0"),
    ({"refresh_every": None}, r"refresh_every must be an integer >= 1, got None"),
    ({"rescore_every": True}, r"rescore_every must be None or an integer >= 1, got True"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be None or an integer >= 1"),
    ({"max_rounds": -1}, r"max_rounds must be None or an integer >= 0"),
    ({"time_budget_s": 0}, r"time_budget_s must be None or a number of seconds > 0"),
    ({"baseline": "no"}, r"baseline must be True or False, got .no."),
    ({"reuse_prefix": 1}, r"reuse_prefix must be True or False, got 1"),
    ({"lazy_margin": 2}, r"lazy_margin must be None or an accuracy in \[0, 1\], got 2"),
    ({"replay_mb": -1}, r"replay_mb must be None or a number of megabytes >= 0, got -1"),
    ({"fast": True}, r"sensitivity: unknown option\(s\) \['fast'\]; accepted keys: .*mode.*top_k.*refresh_every"),
])
def test_sensitivity_option_errors_name_the_parameter_and_accepted_values(options, match):
    import lightning_prune as lp
    from lightning_prune.callbacks import PruneCallback

    model = Net()
    before = copy.deepcopy(model.state_dict())
    x, y = _data(8, seed=0)
    with pytest.raises(ValueError, match=match):
        lp.prune(model, x[:2], flops_reduction=0.3, allocation="sensitivity", val_dataloader=[(x, y)],
                 sensitivity=options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # failed before touching it
    with pytest.raises(ValueError, match=match):
        PruneCallback(flops_reduction=0.3, allocation="sensitivity", sensitivity=options)


def _digits_prune(trained_digits, **options):
    import lightning_prune as lp

    model = copy.deepcopy(trained_digits[0])
    val = trained_digits[1]
    report = lp.prune(model, val[0][0][:2], criterion="l1", flops_reduction=0.5, allocation="sensitivity",
                      val_dataloader=val, sensitivity={"progress": False, "prune_multiple": 2.0, **options})
    assert report.target_met
    return report


def _decisions(report):
    return [(step["chosen"], step["removed"]) for step in report.sensitivity_steps], report.plan


def test_fast_mode_evaluates_fewer_trials_and_refreshes(trained_digits):
    exact = _digits_prune(trained_digits)
    fast = _digits_prune(trained_digits, mode="fast", top_k=1, refresh_every=3)
    groups = len(exact.widths_before)
    trials = [len(step["trials"]) for step in fast.sensitivity_steps]
    # rounds 0, 3, 6... are full refreshes (every eligible group); the rounds between are lazy: one group at a time
    # in the order of the last measurements, until the best fresh one beats every estimate left
    assert all(trials[i] == groups for i in range(0, len(trials), 3))
    lazy = [t for i, t in enumerate(trials) if i % 3]
    assert lazy and all(1 <= t <= groups for t in lazy) and sum(lazy) < groups * len(lazy)
    images = lambda report: sum(step["images"] for step in report.sensitivity_steps)  # counted image-forwards
    assert 0 < images(fast) < images(exact)
    assert fast.flops_reduction >= 0.5


@pytest.mark.parametrize("options", [{"refresh_every": 1}, {"refresh_every": 1, "top_k": 1},
                                     {"refresh_every": 3, "top_k": 100}])
def test_fast_mode_with_every_group_reevaluated_decides_like_exact_mode(trained_digits, options):
    """``refresh_every=1`` makes every round a full one; ``top_k >= groups`` re-evaluates every group between
    refreshes (with a weight criterion the scores are exact, and the predicted FLOPs are exact for this
    convolution/linear network): either way the decisions are exact mode's."""
    exact = _digits_prune(trained_digits)
    fast = _digits_prune(trained_digits, mode="fast", **options)
    assert _decisions(fast) == _decisions(exact)
    assert fast.widths_after == exact.widths_after


def test_a_lazy_round_measures_every_group_within_the_margin_in_its_first_chunk():
    """The first chunk of a lazy round: every group whose estimate lies within the margin of the
    ``num_groups``-th best estimate, or ``top_k`` if those are fewer (one unmasked pass for the groups the round
    would re-measure anyway); never-measured groups (estimate +inf) are always in it."""
    from lightning_prune.allocation import AccuracyEvaluator
    from lightning_prune.allocation.evaluation import LOCAL
    from lightning_prune.allocation.sensitivity import _TrialRunner, lazy_margin_count

    model = Net()
    x, y = _data(144, seed=0)
    graph = DependencyGraph(model, x[:2])
    evaluator = AccuracyEvaluator(model, [(x[i:i + 48], y[i:i + 48]) for i in range(0, 144, 48)])
    estimates = {"a": 144.0, "b": 143.0, "c": 141.0, "d": 130.0}
    estimate = lambda name: estimates.get(name, float("inf"))
    assert 141.0 < 144.0 - lazy_margin_count(144, 144) < 142.0  # so "a" and "b" are within it, "c" is not

    def first_chunk(top_k, num_groups, pending):
        allocator = SensitivityAllocator(mode="fast", top_k=top_k, num_groups=num_groups)
        runner = _TrialRunner(allocator, graph, evaluator, None, LOCAL)
        return allocator._first_chunk(runner, pending, estimate)

    assert first_chunk(1, 1, ["a", "b", "c", "d"]) == 2
    assert first_chunk(3, 1, ["a", "b", "c", "d"]) == 3  # at least top_k
    bar = 143.0 - lazy_margin_count(143, 144)  # two groups chosen per round: within the margin of the second best
    assert first_chunk(1, 2, ["a", "b", "c", "d"]) == sum(v >= bar for v in estimates.values())
    assert first_chunk(1, 1, ["new", "other", "a", "b"]) == 2  # the unmeasured ones first, the measured not
    assert first_chunk(2, 1, []) == 2


def test_the_lazy_margin_buys_re_measurements(trained_digits):
    """The default margin (two plus-four standard errors) re-measures the groups within noise of the best: more
    images than a zero margin, fewer than exact mode (one group per chunk)."""
    images = lambda report: sum(step["images"] for step in report.sensitivity_steps)
    exact = _digits_prune(trained_digits)
    default = _digits_prune(trained_digits, mode="fast", top_k=1)
    bare = _digits_prune(trained_digits, mode="fast", top_k=1, lazy_margin=0.0)
    assert images(bare) < images(default) < images(exact)
    lazy_rounds = lambda report: [len(s["trials"]) for i, s in enumerate(report.sensitivity_steps) if i % 4]
    assert sum(lazy_rounds(bare)) < sum(lazy_rounds(default))


def test_fast_mode_in_a_lightning_fit(tmp_path):
    import pytorch_lightning as pl

    from lightning_prune.callbacks import PruneCallback
    from lightning_prune.datamodules import DigitsDataModule

    from .lightning_modules import IMAGE, PLDigitsClassifier

    pl.seed_everything(0)
    data = DigitsDataModule(image_size=IMAGE, batch_size=64, seed=0)
    callback = PruneCallback(flops_reduction=0.4, epochs=[1], criterion="l1", allocation="sensitivity",
                             sensitivity={"mode": "fast", "top_k": 1, "refresh_every": 2, "progress": False},
                             verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), limit_train_batches=4, limit_val_batches=2)
    module = PLDigitsClassifier()
    trainer.fit(module, datamodule=data)
    report = callback.reports[0]
    assert report["target_met"] and report["flops_reduction"] >= 0.4
    steps = report["sensitivity_steps"]
    assert len(steps) >= 2 and 1 <= len(steps[1]["trials"]) < len(steps[0]["trials"])  # a lazy round
    module.model.train()(torch.zeros(2, 1, IMAGE, IMAGE)).sum().backward()  # the pruned model trains


def test_skipping_the_baseline_saves_one_evaluation_per_round_and_decides_the_same(trained_digits):
    # Separate full passes (with prefix replay the unmasked pass is what the trials replay: never skipped).
    exact = _digits_prune(trained_digits, reuse_prefix=False)
    skipped = _digits_prune(trained_digits, baseline=False, reuse_prefix=False)
    assert _decisions(skipped) == _decisions(exact)
    assert all(step["baseline"] is None for step in skipped.sensitivity_steps)
    assert all(step["baseline"] is not None for step in exact.sensitivity_steps)
    full = sum(len(y) for _, y in trained_digits[1])
    images = lambda report: sum(step["images"] for step in report.sensitivity_steps)
    assert images(skipped) == images(exact) - full * len(exact.sensitivity_steps)  # one full pass less per round


def test_prefix_replay_decides_like_full_passes_at_a_fraction_of_the_work(trained_digits):
    full = _digits_prune(trained_digits, reuse_prefix=False)
    replayed = _digits_prune(trained_digits)
    assert _decisions(replayed) == _decisions(full)
    for a, b in zip(full.sensitivity_steps, replayed.sensitivity_steps):
        assert {n: t["accuracy"] for n, t in a["trials"].items() if t.get("exact", True)} == \
            {n: t["accuracy"] for n, t in b["trials"].items() if t.get("exact", True) and n in a["trials"]
             and a["trials"][n].get("exact", True)}
        assert b["baseline"] == a["baseline"]
    equivalents = lambda report: sum(step["forward_equivalents"] for step in report.sensitivity_steps)
    images = lambda report: sum(step["images"] for step in report.sensitivity_steps)
    assert equivalents(full) == images(full)  # separate passes compute every layer
    assert 0 < equivalents(replayed) < 0.9 * equivalents(full)
