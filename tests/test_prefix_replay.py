"""Prefix replay (structure/replay.py): a trial that changes weights deep in the network replays the unchanged
layers' recorded outputs. The standard is bit-identity with a full forward pass, on the architecture zoo."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from lightning_prune.allocation import AccuracyEvaluator
from lightning_prune.allocation.evaluation import RecordedPasses
from lightning_prune.structure.replay import PrefixReplay, ReplayMismatch

from .zoo import build, choose_channels, graph_for, spread

ZOO_MODELS = ["cifar_resnet56", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "googlenet",
              "shufflenet_v2_x0_5"]


def _replayed_and_full(replay, graph, model, x, group, seed):
    """One trial (30 % of ``group`` masked): its output replayed after ``replay``'s recorded pass, its output of a
    full pass through the wrapped modules, and the cut."""
    removal = {group.name: choose_channels(group, 0.3, seed=seed)}
    targets = graph.mask_targets(removal)
    cut = replay.cut_for([weight for weight, _ in targets])
    with graph.masked(removal, targets):
        replayed = replay.replay(lambda: model(x), cut)
        replay._mode = None  # a plain pass through the wrapped modules computes everything
        return replayed, model(x), cut


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_replayed_trials_equal_full_passes_bit_for_bit(name):
    model, x = build(name)
    graph = graph_for(model, x)
    replay = PrefixReplay(model)
    saved = []
    with torch.no_grad(), replay.attached():
        dense = replay.record(lambda: model(x))
        for group in spread(graph.groups, 5):
            replayed, full, cut = _replayed_and_full(replay, graph, model, x, group, seed=1)
            assert torch.equal(replayed, full), (name, group.name, cut)
            saved.append(replay.computed_fraction(cut))
        again = replay.replay(lambda: model(x), 10**9)  # nothing masked: the whole recording replays
    assert torch.equal(again, dense)
    assert all(0.0 < f <= 1.0 for f in saved) and min(saved) < 0.9  # later groups skip real work
    assert "forward" not in model.__dict__ and all("forward" not in m.__dict__ for m in model.modules())


class InPlaceTail(nn.Module):
    """An in-place layer whose result is not assigned (it writes into its input), then an in-place add on a
    layer output: replay must reproduce both side effects."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv1(x))
        self.relu(x)
        y = self.conv2(x)
        y += x
        return self.conv3(y).mean((2, 3))


def test_replay_reproduces_in_place_side_effects():
    torch.manual_seed(0)
    model = InPlaceTail().eval()
    x = torch.randn(4, 3, 8, 8)
    replay = PrefixReplay(model)
    with torch.no_grad(), replay.attached():
        dense = replay.record(lambda: model(x))
        model.conv3.weight[:, :2] = 0.0  # a change at the last layer: everything before it replays
        cut = replay.cut_for([model.conv3.weight])
        assert cut == 4
        replayed = replay.replay(lambda: model(x), cut)
    assert torch.equal(replayed, model(x)) and not torch.equal(replayed, dense)


def test_memory_budget_clips_the_replayed_prefix_and_stays_exact():
    model, x = build("resnet18")
    graph = graph_for(model, x)
    group = graph.groups[-1]
    removal = {group.name: choose_channels(group, 0.5, seed=0)}
    targets = graph.mask_targets(removal)
    fractions = {}
    for budget in (0, 1024):
        replay = PrefixReplay(model, budget_mb=budget)
        with torch.no_grad(), replay.attached():
            replay.record(lambda: model(x))
            cut = replay.cut_for([w for w, _ in targets])
            with graph.masked(removal, targets):
                out = replay.replay(lambda: model(x), cut)
                replay._mode = None
                assert torch.equal(out, model(x))
        fractions[budget] = replay.computed_fraction(cut)
        assert replay.truncated == (budget == 0)
    assert fractions[0] == 1.0 and fractions[1024] < 0.5


class Switch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.use_b = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(x) if self.use_b else self.a(x))


def test_a_different_call_sequence_is_an_error_not_a_wrong_value():
    model = Switch().eval()
    x = torch.randn(3, 4)
    replay = PrefixReplay(model)
    with torch.no_grad(), replay.attached():
        replay.record(lambda: model(x))
        model.use_b = True
        with pytest.raises(ReplayMismatch, match="reuse_prefix"):
            replay.replay(lambda: model(x), cut=2)
    assert "forward" not in model.a.__dict__  # unwrapped on the way out


def _digits_trials(trained_digits):
    """Half of every group of the trained digits CNN masked, one trial per group: the model, its validation
    batches, an evaluator of the unmasked model, each trial's count from a separate full pass, and the trials and
    changed weights for :meth:`AccuracyEvaluator.correct_trials`."""
    model, val = copy.deepcopy(trained_digits[0]), trained_digits[1]
    graph = graph_for(model, val[0][0][:2])
    from lightning_prune.criteria import get

    l1 = get("l1")
    removals = {g.name: g.lowest(l1.score(g), g.size // 2) for g in graph.groups}
    full = AccuracyEvaluator(model, val)
    expected = {}
    for name, indices in removals.items():
        with graph.masked({name: indices}):
            expected[name] = full.correct()[0]
    targets = {name: graph.mask_targets({name: ix}) for name, ix in removals.items()}
    trials = {name: functools.partial(graph.masked, {name: ix}, targets[name]) for name, ix in removals.items()}
    changed = {name: [w for w, _ in t] for name, t in targets.items()}
    return model, val, full, expected, trials, changed


def test_evaluator_counts_match_separate_passes_with_early_exit(trained_digits):
    model, val, full, expected, trials, changed = _digits_trials(trained_digits)
    evaluator = AccuracyEvaluator(model, val)
    baseline, counts = evaluator.correct_trials(trials, changed)
    assert baseline == full.correct()[0]
    assert {name: c for name, (c, _) in counts.items()} == expected
    assert evaluator.images == (len(trials) + 1) * full.total
    assert evaluator.forward_equivalents < evaluator.images
    # a batch that does not fit the budget replays nothing, says so, and counts the same
    squeezed = AccuracyEvaluator(model, val)
    with pytest.warns(RuntimeWarning, match="raise replay_mb"):
        assert squeezed.correct_trials(trials, changed, replay_mb=0) == (baseline, counts)
    assert squeezed.forward_equivalents == squeezed.images
    # early exit: the best trial is exact, the others are either exact or bounded above by their true count
    _, bounded = AccuracyEvaluator(model, val).correct_trials(trials, changed, keep=1)
    best = max(expected.values())
    for name, (correct, seen) in bounded.items():
        upper = correct + full.total - seen
        assert upper >= expected[name] and (seen == full.total or upper < best)


@pytest.mark.parametrize("name", ["cifar_resnet56", "mobilenet_v2"])
def test_a_restored_pass_replays_bit_for_bit_in_a_new_replay(name):
    """A pass recorded, snapshotted, then restored into another PrefixReplay (after other passes were recorded)
    replays exactly as the full pass on its input: in-place layers included (copies where the pass mutates)."""
    model, x = build(name)
    graph = graph_for(model, x)
    other = torch.randn_like(x)
    first = PrefixReplay(model)
    with torch.no_grad(), first.attached():
        dense = first.record(lambda: model(x))
        kept = first.snapshot()
        first.record(lambda: model(other))
    again = PrefixReplay(model)
    with torch.no_grad(), again.attached():
        again.restore(kept)
        assert torch.equal(again.replay(lambda: model(x), 10**9), dense)
        for group in spread(graph.groups, 3):
            replayed, full, cut = _replayed_and_full(again, graph, model, x, group, seed=2)
            assert torch.equal(replayed, full), (name, group.name, cut)


def test_calls_sharing_recorded_passes_count_the_same_and_run_the_unchanged_model_once(trained_digits):
    """A lazy round's chunks: the second call restores the first call's passes of the unchanged model instead of
    running it again; every count is the one of separate full passes."""
    model, val, full, expected, trials, changed = _digits_trials(trained_digits)
    names = list(expected)
    chunks = [names[: len(names) // 2], names[len(names) // 2:]]
    evaluator, recorded, counts = AccuracyEvaluator(model, val), RecordedPasses(), {}
    for chunk in chunks:
        before = evaluator.images
        baseline, part = evaluator.correct_trials({n: trials[n] for n in chunk}, {n: changed[n] for n in chunk},
                                                  recorded=recorded)
        assert baseline == full.correct()[0]
        counts.update({name: c for name, (c, _) in part.items()})
        ran_unchanged = evaluator.images - before - len(chunk) * full.total
        assert ran_unchanged == (full.total if chunk is chunks[0] else 0)
    assert counts == expected and len(recorded.passes) == len(val)
    # passes are kept while they fit the replay budget in all; the batches after run again in every call
    one_batch = recorded.passes[0][1].stored_bytes
    assert all(p.stored_bytes == one_batch for _, p in recorded.passes.values())  # equal batches of 16
    tight, evaluator = RecordedPasses(), AccuracyEvaluator(model, val)
    budget_mb = 1.5 * one_batch / 2**20
    for chunk in chunks:
        before = evaluator.images
        _, part = evaluator.correct_trials({n: trials[n] for n in chunk}, {n: changed[n] for n in chunk},
                                           replay_mb=budget_mb, recorded=tight)
        assert {name: c for name, (c, _) in part.items()} == {name: expected[name] for name in chunk}
        ran_unchanged = evaluator.images - before - len(chunk) * full.total
        assert ran_unchanged == (full.total if chunk is chunks[0] else full.total - len(val[0][1]))
    assert tight.full and list(tight.passes) == [0]


class SometimesInPlace(nn.Module):
    """Modifies a layer's output in place only when ``bump`` is set: a pass that mutates an output the earlier
    passes left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)
        self.bump = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.bump:
            out.add_(1.0)
        return self.conv2(out).mean((2, 3))


def test_an_output_mutated_only_in_a_later_pass_is_copied_from_then_on():
    torch.manual_seed(0)
    model = SometimesInPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    replay = PrefixReplay(model)
    with torch.no_grad(), replay.attached():
        replay.record(lambda: model(x))  # conv1's output untouched: kept by reference
        model.bump = True
        for _ in range(2):  # the first of these finds conv1's output modified: the prefix ends before it
            replay.record(lambda: model(x))
            with torch.no_grad():
                model.conv2.weight[0] = 0.0
            replayed = replay.replay(lambda: model(x), cut=1)
            replay._mode = None
            assert torch.equal(replayed, model(x))
        assert replay.computed_fraction(1) < 1.0  # the third pass replays conv1 again, as a copy
