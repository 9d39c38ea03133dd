"""Groups whose channel mapping is not one channel per position (issue #15), on small synthetic modules that
reproduce the timm patterns: a ghost block (tied channels, a narrow member), res2net / dual-path / CSP / mixnet
splits and concatenations (Torch-Pruning mis-maps them), groups that break only at the amount really removed,
exclusion probing with one graph build, ``event_timeout``, and targets that count the groups left unpruned.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import lightning_prune as lp
from lightning_prune import criteria
from lightning_prune.errors import EventTimeoutError, UnsupportedModelError
from lightning_prune.pruning import prune_event
from lightning_prune.structure import DependencyGraph, EventDeadline, GroupMember

from .zoo import assert_outputs_close, disconnect, randomize_normalization


def cbr(i: int, o: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class GhostModule(nn.Module):
    """ghostnet's module: a primary conv and a depthwise "cheap" conv that reads the primary's output, concatenated."""

    def __init__(self, inp: int, oup: int):
        super().__init__()
        self.primary_conv = cbr(inp, oup // 2, 1)
        self.cheap_operation = cbr(oup // 2, oup // 2, 3, groups=oup // 2)

    def forward(self, x):
        a = self.primary_conv(x)
        return torch.cat([a, self.cheap_operation(a)], 1)


class GhostNetLike(nn.Module):
    """ghostnet's first block: a 16-channel stem plus two ghost modules added back onto it. Channel j and j + 8 of
    the stem's group are both written by filter j of the 8-channel ``ghost2.primary_conv``."""

    def __init__(self):
        super().__init__()
        self.conv_stem = cbr(3, 16)
        self.ghost1 = GhostModule(16, 16)
        self.ghost2 = GhostModule(16, 16)
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.conv_stem(x)
        x = x + self.ghost2(self.ghost1(x))
        return self.fc(self.head(x).mean((2, 3)))


class Res2NetLike(nn.Module):
    """res2net's bottleneck: conv1's output split into width-chunks, chunk i (plus the previous result) through its
    own conv, re-concatenated with the last chunk."""

    def __init__(self, width: int = 8, scale: int = 4):
        super().__init__()
        self.width = width
        self.conv1 = cbr(3, width * scale, 1)
        self.convs = nn.ModuleList([cbr(width, width) for _ in range(scale - 1)])
        self.conv3 = cbr(width * scale, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        chunks = torch.split(self.conv1(x), self.width, 1)
        outs, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = conv(chunks[i] if i == 0 else sp + chunks[i])
            outs.append(sp)
        return self.fc(self.conv3(torch.cat(outs + [chunks[-1]], 1)).mean((2, 3)))


class CSPLike(nn.Module):
    """A CSP stage: the expansion conv's output split in two halves, one through blocks, then concatenated."""

    def __init__(self):
        super().__init__()
        self.conv_exp = cbr(3, 16, 1)
        self.block = nn.Sequential(cbr(8, 8), cbr(8, 8))
        self.conv_transition_b = cbr(8, 8, 1)
        self.conv_transition = cbr(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        shortcut, body = self.conv_exp(x).split(8, dim=1)
        body = self.conv_transition_b(self.block(body))
        return self.fc(self.conv_transition(torch.cat([shortcut, body], 1)).mean((2, 3)))


class DualPathLike(nn.Module):
    """dpn: the block's output sliced into a residual part (added) and a dense part (concatenated)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24, 1)
        self.c1 = cbr(24, 8, 1)
        self.c3 = cbr(8, 20, 3)
        self.head = cbr(28, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.c3(self.c1(x))
        resid = x[:, :16] + out[:, :16]
        dense = torch.cat([x[:, 16:], out[:, 16:]], 1)
        return self.fc(self.head(torch.cat([resid, dense], 1)).mean((2, 3)))


class MixNetLike(nn.Module):
    """mixnet's MixedConv: ``split_with_sizes`` into unequal chunks, each through its own depthwise kernel."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24, 1)
        self.dw = nn.ModuleList([cbr(16, 16, 3, groups=16), cbr(8, 8, 5, groups=8)])
        self.pw = cbr(24, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        parts = torch.split(self.stem(x), [16, 8], 1)
        return self.fc(self.pw(torch.cat([c(p) for c, p in zip(self.dw, parts)], 1)).mean((2, 3)))


def build(cls: type, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = cls()
    randomize_normalization(model, seed)
    return model.eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# -- ghost block: tied channels and a narrow member ------------------------------------------------------------
def test_ghost_group_is_numbered_on_the_stem_and_ties_channels_j_and_j_plus_8():
    model, x = build(GhostNetLike)
    graph = DependencyGraph(model, x)
    stem = graph.group("conv_stem.0")
    assert stem.size == 16  # every channel of the widest tensor counts, not the 8 of the cheap conv
    assert stem.closure([0]) == [0, 8] and stem.closure([3, 11]) == [3, 11]
    assert graph.group("ghost1.primary_conv.0").closure([2]) == [2]  # ordinary groups: no ties


def test_ghost_prune_counts_what_is_really_removed_and_keeps_every_member():
    model, x = build(GhostNetLike)
    report = lp.prune(model, x, criterion="l2", amount=0.5)
    widths = conv_widths(model)
    assert min(widths.values()) >= 1
    # the report and the plan count the real widths after surgery
    assert report.widths_after["conv_stem.0"] == widths["conv_stem.0"]
    assert report.removed["conv_stem.0"] == 16 - widths["conv_stem.0"]
    assert len(report.plan["groups"]["conv_stem.0"]["kept"]) == widths["conv_stem.0"]
    assert widths["ghost2.primary_conv.0"] * 2 == widths["conv_stem.0"]  # ties removed in pairs
    assert report.target_met and report.channel_sparsity == pytest.approx(0.5, abs=0.05)
    rebuilt = apply_plan_copy(GhostNetLike, report.plan, x)
    assert conv_widths(rebuilt) == widths


def apply_plan_copy(cls: type, plan: dict, x: torch.Tensor) -> nn.Module:
    fresh, _ = build(cls)
    lp.apply_plan(fresh, plan, x)
    return fresh


def test_ghost_removal_equals_disconnecting_the_tied_channels():
    model, x = build(GhostNetLike)
    graph = DependencyGraph(copy.deepcopy(model), x)
    group = graph.group("conv_stem.0")
    reference = copy.deepcopy(model)
    disconnect(reference, group, group.closure([1, 4]))  # before surgery: the members' modules are the graph's
    result = graph.prune_groups({"conv_stem.0": [1, 4]})
    assert result.removed["conv_stem.0"] == [1, 4, 9, 12]
    with torch.no_grad():
        assert_outputs_close(graph.model(x), reference(x))
    with graph.masked({"ghost1.primary_conv.0": [0, 5]}), torch.no_grad():
        masked = graph.model(x)
    graph.prune_groups({"ghost1.primary_conv.0": [0, 5]})
    with torch.no_grad():
        assert_outputs_close(graph.model(x), masked)


def test_removal_that_would_empty_a_member_is_refused_by_name():
    model, x = build(GhostNetLike)
    graph = DependencyGraph(model, x)
    with pytest.raises(ValueError, match="conv_stem.0.*tied channels included"):
        graph.prune_groups({"conv_stem.0": list(range(8))})  # 8 asked, 16 really: nothing would be left
    stem = graph.group("conv_stem.0")
    scores = torch.arange(16, dtype=torch.float64)
    chosen = stem.lowest(scores, 15)  # as many as allowed: pairs only, and one pair must stay
    assert len(chosen) == 14 and stem.closure(chosen) == chosen
    graph.prune_groups({"conv_stem.0": chosen})
    assert model.ghost2.primary_conv[0].out_channels == 1


# -- split / concat patterns Torch-Pruning mis-maps --------------------------------------------------------------
MISMAPPED = {
    "res2net": (Res2NetLike, "conv1.0"),
    "csp": (CSPLike, "conv_exp.0"),
    "dpn": (DualPathLike, "stem.0"),
    "mixnet": (MixNetLike, "stem.0"),
}


@pytest.mark.parametrize("name", sorted(MISMAPPED))
def test_mismapped_groups_are_left_out_with_the_module_and_op_named(name):
    cls, bad = MISMAPPED[name]
    model, x = build(cls)
    graph = DependencyGraph(copy.deepcopy(model), x)
    assert bad not in {g.name for g in graph.groups}
    reason = graph.unmappable[bad]
    assert reason.startswith("UnsupportedModelError") and repr(bad) in reason and "(through _" in reason
    for group in graph.groups:  # scoring reads every member's weights: no IndexError
        group.filters()
    # what is left prunes correctly: all remaining groups at once equal disconnecting them
    removals = {g.name: g.lowest(torch.arange(g.size), g.size // 2) for g in graph.groups}
    reference = copy.deepcopy(model)
    for group in graph.groups:
        disconnect(reference, group, removals[group.name])
    graph.prune_groups(removals)
    with torch.no_grad():
        assert_outputs_close(graph.model(x), reference(x))


@pytest.mark.parametrize("name", sorted(MISMAPPED))
def test_prune_succeeds_and_the_target_counts_the_groups_left_out(name):
    cls, bad = MISMAPPED[name]
    model, x = build(cls)
    with pytest.warns(UserWarning) as caught:
        report = lp.prune(model, x, criterion="l2", amount=0.5)
    messages = [str(w.message) for w in caught]
    assert any("left unpruned" in m and repr(bad) in m for m in messages)  # named, with the module and op
    assert any("unmappable" in m and "count against the target" in m for m in messages)
    assert not report.target_met
    assert bad in report.unprunable_widths
    original, current = report.unprunable_widths[bad]
    assert original == current == dict(model.named_modules())[bad].out_channels
    pruned = sum(report.original_widths.values()) - sum(report.widths_after.values())
    assert report.channel_sparsity == pytest.approx(pruned / (sum(report.original_widths.values()) + original))
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_weight_rows_of_a_mismapped_member_is_a_clear_error():
    conv = nn.Conv2d(3, 4, 1)
    member = GroupMember("body.conv", conv, "out", torch.tensor([0, 6]), torch.tensor([0, 1]))
    with pytest.raises(UnsupportedModelError, match="body.conv"):
        member.weight_rows()


# -- exclusion probing: real amounts, one build ------------------------------------------------------------------
class NeedsWidth(nn.Module):
    """Breaks when its input has fewer than ``minimum`` channels (a hard-coded width, like a ViT reshape)."""

    def __init__(self, minimum: int):
        super().__init__()
        self.minimum = minimum

    def forward(self, x):
        if x.shape[1] < self.minimum:
            raise RuntimeError(f"needs at least {self.minimum} channels, got {x.shape[1]}")
        return x


class FragileStages(nn.Module):
    """Six conv stages; stages 1 and 4 break when cut to less than 6 of their 8 channels (one channel is fine)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([cbr(3 if i == 0 else 8, 8) for i in range(6)])
        self.checks = nn.ModuleList([NeedsWidth(6 if i in (1, 4) else 1) for i in range(6)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv, check in zip(self.convs, self.checks):
            x = check(conv(x))
        return self.fc(x.mean((2, 3)))


def test_probing_finds_groups_that_break_at_the_real_amount_with_one_graph_build(monkeypatch):
    model, x = build(FragileStages)
    graph = DependencyGraph(model, x)
    removals = {g.name: g.lowest(torch.arange(g.size), 4) for g in graph.groups}
    assert graph.find_unprunable(list(removals)) == {}  # one channel each breaks nothing
    builds = []
    original = DependencyGraph._trace_on
    monkeypatch.setattr(DependencyGraph, "_trace_on",
                        lambda self, inputs, **kwargs: builds.append(1) or original(self, inputs, **kwargs))
    before = copy.deepcopy(model.state_dict())
    broken = graph.find_unprunable(removals)
    assert set(broken) == {"convs.1.0", "convs.4.0"} and "needs at least 6" in broken["convs.1.0"]
    assert len(builds) == 1  # one copy, bisected in place: no rebuild per failing group
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_excludes_groups_that_break_at_the_real_amount():
    model, x = build(FragileStages)
    with pytest.warns(UserWarning, match="cannot be pruned"):
        report = lp.prune(model, x, criterion="l2", amount=0.5)
    assert conv_widths(model)["convs.1.0"] == 8 and conv_widths(model)["convs.2.0"] == 4
    assert set(report.unprunable_widths) == {"convs.1.0", "convs.4.0"}
    assert not report.target_met  # 2 of 6 groups left at full width count against 50 %
    assert report.channel_sparsity == pytest.approx(16 / 48)


# -- one bound for the whole event ----------------------------------------------------------------------------------
def test_event_timeout_stops_the_event_and_leaves_the_model_unchanged():
    model, x = build(GhostNetLike)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(EventTimeoutError, match="event_timeout=1e-06"):
        lp.prune(model, x, criterion="l2", amount=0.5, event_timeout=1e-6)
    assert conv_widths(model)["conv_stem.0"] == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [0, -1.0, "10"])
def test_event_timeout_must_be_positive_seconds(value):
    model, x = build(GhostNetLike)
    with pytest.raises((ValueError, TypeError), match="event_timeout"):
        lp.prune(model, x, criterion="l2", amount=0.5, event_timeout=value)


def test_a_timeout_after_a_successful_surgery_restores_the_event_start():
    """The bound is hit after this event already removed channels: the model, the plan and the graph go back to
    the event's start (the timeout is raised from ``on_surgery`` here, which is where the next check would be)."""
    model, x = build(GhostNetLike)
    graph = DependencyGraph(model, x)
    before, widths = copy.deepcopy(model.state_dict()), graph.widths()
    deadline = EventDeadline(3600.0)

    def out_of_time(result):
        raise deadline.error("testing the rollback")

    with pytest.raises(EventTimeoutError, match="event_timeout=3600 s was reached while testing the rollback"):
        prune_event(graph, criteria.get("l2"), 0.5, on_surgery=out_of_time, event_timeout=deadline)
    assert conv_widths(model)["conv_stem.0"] == 16 and graph.plan.is_empty() and graph.widths() == widths
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    graph.prune_groups({"conv_stem.0": [2]})  # the graph still fits the model
    assert conv_widths(model)["conv_stem.0"] == 14


class ShuffleLike(nn.Module):
    """ShuffleNet's channel shuffle (view / transpose / view): the groups crossing it are frozen."""

    def __init__(self):
        super().__init__()
        self.conv1 = cbr(3, 8, 1)
        self.conv2 = cbr(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.conv2(x).mean((2, 3)))


def test_groups_through_a_frozen_op_count_against_a_channel_target():
    model, x = build(ShuffleLike)
    graph = DependencyGraph(model, x)
    assert "conv1.0" not in {g.name for g in graph.groups} and graph.unprunable_widths["conv1.0"] == (8, 8)
    graph.prune_groups({"conv2.0": [0, 1, 2, 3]})
    assert graph.channel_sparsity() == pytest.approx(0.5)  # over the prunable groups (what allocation aims at)
    assert graph.channel_sparsity(include_unprunable=True) == pytest.approx(4 / 16)


def test_a_cycle_of_views_is_cut_instead_of_exhausting_memory():
    """Swin V2: Torch-Pruning's reshape mapping multiplies the attention heads' channel indices around a cycle of
    views (3 -> 96 -> 3,072 -> 98,304 -> ...) until memory runs out. The growth is stopped at four times the widest
    layer: that group is left unpruned, naming the cycle, and the rest of the model is pruned, in seconds."""
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    graph = DependencyGraph(model, x, build_timeout=60, max_build_memory_mb=4096)
    assert graph.groups
    assert any("a cycle of views" in reason for reason in graph.unmappable.values())
    report = lp.prune(model, x, criterion="l2", amount=0.5)
    assert report.removed and report.params_after < report.params_before
    assert model.eval()(x).shape == (1, 10)
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
