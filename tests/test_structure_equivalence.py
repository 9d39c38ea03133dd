"""The equivalence oracle on a zoo of real architectures.

Removing channels physically must give the same eval-mode output as the unpruned model in which every consumer
weight reading those channels is zeroed. Checked per group (on a spread of groups) and for all groups at once.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lightning_prune.structure import DependencyGraph

from .zoo import ZOO, assert_outputs_close, build, choose_channels, disconnect, mixes_channels, spread

GROUPS_PER_MODEL = 4


@pytest.mark.parametrize("name", sorted(ZOO))
def test_removing_channels_equals_disconnecting_them(name):
    model, x = build(name)
    graph = DependencyGraph(copy.deepcopy(model), x)
    assert graph.groups, f"{name}: no prunable group found"
    checkable = [g for g in graph.groups if not mixes_channels(g)]
    assert checkable, f"{name}: every group mixes channels; the oracle checks nothing"

    for index, group in enumerate(spread(checkable, GROUPS_PER_MODEL)):
        pruned = copy.deepcopy(model)
        pruned_graph = DependencyGraph(pruned, x)
        channels = choose_channels(group, 0.4, seed=index)
        pruned_graph.prune(group.name, channels)

        reference = copy.deepcopy(model)
        disconnect(reference, group, channels)
        with torch.no_grad():
            assert_outputs_close(pruned.eval()(x), reference.eval()(x))
        assert pruned_graph.group(group.name).size == group.size - len(channels)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruning_every_group_at_once(name):
    model, x = build(name)
    pruned = copy.deepcopy(model)
    graph = DependencyGraph(pruned, x)
    removals = {g.name: choose_channels(g, 0.3, seed=i) for i, g in enumerate(graph.groups)}
    params_before = sum(p.numel() for p in pruned.parameters())

    graph.prune_groups(removals)

    assert sum(p.numel() for p in pruned.parameters()) < params_before
    reference = copy.deepcopy(model)
    oracle_applies = True
    for group in DependencyGraph(copy.deepcopy(model), x).groups:
        if mixes_channels(group):
            oracle_applies = False
        disconnect(reference, group, removals[group.name])
    with torch.no_grad():
        out = pruned.eval()(x)
        if oracle_applies:
            assert_outputs_close(out, reference.eval()(x))
        else:
            assert out.shape == reference.eval()(x).shape

    # The pruned model trains: train-mode forward (aux heads included) and backward reach every parameter.
    pruned.train()
    output = pruned(x)
    outputs = [output] if isinstance(output, torch.Tensor) else [o for o in output if isinstance(o, torch.Tensor)]
    sum(o.float().pow(2).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
