"""Uniform and global channel allocation (lightning_prune.allocation.allocate)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_prune.allocation import ALLOCATIONS, allocate, round_width
from lightning_prune.criteria import get
from lightning_prune.structure import DependencyGraph


def _net() -> nn.Module:
    """Three prunable groups: '0' (8 ch, feeds a 2-group conv: divisions 2), '3' (16 ch, divisions 2), '5' (12)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 12, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


@pytest.fixture
def graph() -> DependencyGraph:
    return DependencyGraph(_net(), torch.randn(2, 3, 8, 8))


def _scores(graph: DependencyGraph, offsets: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Distinct, known scores: channel i of group g scores offset_g + i/100 (a permutation makes order non-trivial)."""
    offsets = offsets or {}
    out = {}
    for g in graph.groups:
        perm = torch.randperm(g.size, generator=torch.Generator().manual_seed(g.size))
        out[g.name] = offsets.get(g.name, 0.0) + perm.to(torch.float64) / 100
    return out


def _widths_after(graph: DependencyGraph, removals: dict[str, list[int]]) -> dict[str, int]:
    return {g.name: g.size - len(removals.get(g.name, [])) for g in graph.groups}


def test_groups_of_the_test_net(graph):
    assert [(g.name, g.size, g.divisions) for g in graph.groups] == [("0", 8, 2), ("3", 16, 2), ("5", 12, 1)]
    assert ALLOCATIONS == ("uniform", "global", "sensitivity")


def test_round_width():
    assert round_width(11.2) == 11
    assert round_width(10 * (1 - 0.7)) == 3  # float noise does not round 3.0000000000000004 up
    assert round_width(2.5) == 3  # half up: keep more
    assert round_width(5, 8) == 8 and round_width(3.9, 8) == 8 and round_width(12.1, 8) == 16
    assert round_width(0.3, divisions=2) == 2  # never below one chunk
    assert round_width(2, 8, maximum=4) == 2  # too narrow for round_to: only divisions apply
    assert round_width(6, 4, divisions=6) == 12  # lcm(4, 6)


def test_uniform_removes_lowest_scored_per_group(graph):
    scores = _scores(graph)
    removals = allocate(graph, scores, 0.5, allocation="uniform")
    assert _widths_after(graph, removals) == {"0": 4, "3": 8, "5": 6}
    for g in graph.groups:
        # the removed set is the lowest-scored one (per-chunk mean for the grouped-conv groups)
        assert removals[g.name] == g.lowest(scores[g.name], len(removals[g.name]))
        g.validate_removal(removals[g.name])  # same positions in every chunk
    chunk = 4  # group '0': 2 chunks of 4; removed positions repeat in both chunks
    assert sorted({i % chunk for i in removals["0"]}) == sorted(i for i in removals["0"] if i < chunk)
    # group '5' has no divisions: exactly its 6 lowest scores
    order = torch.argsort(scores["5"])[:6].tolist()
    assert removals["5"] == sorted(order)
    graph.prune_groups(removals)
    assert graph.widths() == {"0": 4, "3": 8, "5": 6}
    assert math.isclose(graph.channel_sparsity(), 0.5)


def test_uniform_is_deterministic_on_ties(graph):
    flat = {g.name: torch.ones(g.size) for g in graph.groups}
    removals = allocate(graph, flat, 0.25)
    assert removals == {"0": [0, 4], "3": [0, 1, 8, 9], "5": [0, 1, 2]}
    assert allocate(graph, flat, 0.25) == removals


def test_uniform_round_to_and_divisions(graph):
    removals = allocate(graph, _scores(graph), 0.5, round_to=4)
    widths = _widths_after(graph, removals)
    # '5': 6 -> nearest multiple of 4, half up = 8; '0': 4; '3': 8
    assert widths == {"0": 4, "3": 8, "5": 8}
    assert all(w % 4 == 0 for w in widths.values())
    # round_to larger than a group: that group is only rounded to its divisions, never below one chunk
    removals = allocate(graph, _scores(graph), 0.9, round_to=16)
    widths = _widths_after(graph, removals)
    assert widths["3"] == 16  # 1.6 -> nearest multiple of 16 would be 0: at least one step = 16 (no removal)
    assert widths["0"] == 2 and widths["5"] == 2  # 0.8 -> chunk minimum 2; 1.2 -> max(1, ceil(12 * 0.1)) = 2
    for g in graph.groups:
        if g.name in removals:
            g.validate_removal(removals[g.name])


def test_max_group_sparsity_caps_uniform(graph):
    widths = _widths_after(graph, allocate(graph, _scores(graph), 0.95, max_group_sparsity=0.5))
    assert widths == {"0": 4, "3": 8, "5": 6}


def test_global_uses_one_threshold_over_raw_scores(graph):
    # group '5' scores far below the others: a global threshold takes it first, up to its cap
    scores = _scores(graph, {"0": 10.0, "3": 20.0, "5": 0.0})
    removals = allocate(graph, scores, 0.25, allocation="global")  # round(0.25 * 36) = 9 channels
    assert {k: len(v) for k, v in removals.items()} == {"5": 9}
    assert removals["5"] == sorted(torch.argsort(scores["5"])[:9].tolist())
    # at 0.5 (18 channels) group '5' stops at its cap ceil(12 * 0.1) = 2 kept; the rest comes from '0' (next lowest)
    removals = allocate(graph, scores, 0.5, allocation="global")
    widths = _widths_after(graph, removals)
    assert sum(len(v) for v in removals.values()) == 18
    # '5' gives 10 (keeps 2); '0' (next lowest, divisions 2) gives 6 and keeps one position per chunk;
    # the remaining 2 come from '3'
    assert widths == {"0": 2, "3": 14, "5": 2}
    for g in graph.groups:
        if g.name in removals:
            g.validate_removal(removals[g.name])
    graph.prune_groups(removals)
    assert math.isclose(graph.channel_sparsity(), 0.5)


def test_global_max_group_sparsity(graph):
    scores = _scores(graph, {"0": 10.0, "3": 20.0, "5": 0.0})
    removals = allocate(graph, scores, 0.25, allocation="global", max_group_sparsity=0.5)
    assert {k: len(v) for k, v in removals.items()} == {"5": 6, "0": 4}  # '5' capped at 6, then '0' in pairs


def test_global_round_to(graph):
    scores = _scores(graph, {"0": 10.0, "3": 20.0, "5": 0.0})
    removals = allocate(graph, scores, 0.3, allocation="global", round_to=4)
    widths = _widths_after(graph, removals)
    assert sum(g.size for g in graph.groups) - sum(widths.values()) >= round(0.3 * 36)
    assert all(w % 4 == 0 for w in widths.values())
    # the cheapest group '5' would stop at its cap of 2, which rounds up to 4; '0' gives the rest
    assert widths == {"0": 4, "3": 16, "5": 4}


def test_cumulative_targets_never_unprune(graph):
    for allocation in ("uniform", "global"):
        g = DependencyGraph(_net(), torch.randn(2, 3, 8, 8))
        l2 = get("l2")
        first = allocate(g, {x.name: l2.score(x) for x in g.groups}, 0.25, allocation=allocation)
        g.prune_groups(first)
        # a target of 9 channels; global may overshoot by one when the last unit is a grouped-conv pair
        assert 9 / 36 <= g.channel_sparsity() <= 10 / 36
        # asking for the same or a lower target again removes nothing
        scores = {x.name: l2.score(x) for x in g.groups}
        assert allocate(g, scores, 0.25, allocation=allocation) == {}
        assert allocate(g, scores, 0.1, allocation=allocation) == {}
        second = allocate(g, scores, 0.5, allocation=allocation)
        g.prune_groups(second)
        assert 0.5 <= g.channel_sparsity() <= 0.5 + 1 / 36 + 1e-9, allocation
        assert all(x.original_size in (8, 16, 12) for x in g.groups)


def test_global_on_a_real_model_reaches_target():
    from lightning_prune.models import create_model

    model = create_model("digits_cnn", num_classes=10, in_channels=1, width=8)
    g = DependencyGraph(model, torch.randn(2, 1, 8, 8))
    l1 = get("l1")
    removals = allocate(g, {x.name: l1.score(x) for x in g.groups}, 0.4, allocation="global")
    g.prune_groups(removals)
    total = sum(x.original_size for x in g.groups)
    assert sum(x.original_size - x.size for x in g.groups) == round(0.4 * total)
    assert all(x.size >= math.ceil(0.1 * x.original_size) for x in g.groups)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_errors(graph):
    scores = _scores(graph)
    with pytest.raises(ValueError, match="allocation.*'uniform'.*'global'"):
        allocate(graph, scores, 0.5, allocation="layerwise")
    with pytest.raises(ValueError, match="SensitivityAllocator"):
        allocate(graph, scores, 0.5, allocation="sensitivity")
    for bad in (1.0, -0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="amount"):
            allocate(graph, scores, bad)
    with pytest.raises(ValueError, match="round_to"):
        allocate(graph, scores, 0.5, round_to=0)
    with pytest.raises(ValueError, match="max_group_sparsity"):
        allocate(graph, scores, 0.5, max_group_sparsity=0.0)
    with pytest.raises(ValueError, match="scores.*'5'"):
        allocate(graph, {k: v for k, v in scores.items() if k != "5"}, 0.5)
    with pytest.raises(ValueError, match="expected 12"):
        allocate(graph, dict(scores, **{"5": torch.ones(3)}), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        allocate(graph, dict(scores, **{"5": torch.full((12,), float("nan"))}), 0.5)
    assert allocate(graph, scores, 0.0) == {}
