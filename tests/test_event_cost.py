"""What one prune event costs, in machine-independent counts (fvcore counts, full-model forwards), and that the
cheaper event reports exactly what the costlier one measured (FLOPs after surgery, train- and eval-mode runs)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import lightning_prune as lp
from lightning_prune.structure import DependencyGraph, FlopsModel, ParameterLineage, count_flops


def _forwards(model: nn.Module) -> dict:
    counts = {"n": 0}
    model.register_forward_pre_hook(lambda module, args: counts.__setitem__("n", counts["n"] + 1))
    return counts


class TinyDense(nn.Module):
    """A DenseNet-like net whose forward pools functionally (FLOPs outside leaf modules)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.block(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "tiny_dense"])
def test_flops_after_equals_a_fresh_fvcore_count(name, fvcore_analyses):
    torch.manual_seed(0)
    model = TinyDense() if name == "tiny_dense" else torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    report = lp.prune(model, x, criterion="l2", amount=0.5)
    counted = fvcore_analyses["n"]
    assert report.flops_after < report.flops_before
    assert report.flops_after == count_flops(model, x, backend="fvcore")  # exact, not predicted
    # fvcore's rules are applied during the graph's reference forward: no fvcore trace at all. (The functional
    # pooling of tiny_dense sits outside any module, so its FLOPs after surgery are counted again, by the rules.)
    assert counted == 0


def test_exact_after_refuses_without_an_observed_forward():
    model = torchvision.models.resnet18(num_classes=10)
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    dense = FlopsModel(graph, graph.example_inputs)
    assert dense.exact_after() == dense.total_measured  # nothing removed yet: the count itself
    graph._observed_widths = None  # no forward of the current model seen: cannot derive the pooling FLOPs
    assert dense.exact_after() is None


def test_one_event_runs_two_forwards_without_mode_dependent_branches(fvcore_analyses):
    model = torchvision.models.resnet18(num_classes=10)
    forwards = _forwards(model)
    x = torch.randn(1, 3, 64, 64)
    lp.prune(model, x, criterion="l2", amount=0.5)
    # the eval-mode trace (also the reference forward, FLOPs counted during it) + the eval check after surgery;
    # Torch-Pruning's MetaPruner makes two forwards too
    assert fvcore_analyses["n"] == 0 and forwards["n"] == 2


class AuxNet(nn.Module):
    """An auxiliary head that runs in train mode only (like GoogLeNet's)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Linear(8 * 16 * 16, 4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        out = self.head(self.b(x).mean((2, 3)))
        if self.training:
            return out, self.aux(x.flatten(1))
        return out


def test_train_mode_check_runs_exactly_when_the_model_has_mode_dependent_branches():
    x = torch.randn(1, 3, 16, 16)
    plain = DependencyGraph(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))
    assert not plain.has_mode_dependent_branches
    model = AuxNet()
    forwards = _forwards(model)
    graph = DependencyGraph(model, x)
    assert forwards["n"] == 2  # the eval trace left `aux` unrun: a train-mode trace followed
    assert graph.has_mode_dependent_branches and "aux" in {m.module_name for g in graph.groups for m in g.members}
    forwards["n"] = 0
    graph.prune_groups({"a.0": [0, 1, 2, 3]})
    assert forwards["n"] == 2  # eval check + train check
    model.train()
    out, aux = model(torch.randn(2, 3, 16, 16))  # the train-only head reads the pruned channels
    assert model.aux.in_features == 4 * 16 * 16 and aux.shape == (2, 4)


def test_train_mode_trace_falls_back_to_two_images_for_1x1_batchnorm():
    model = torchvision.models.resnet18(num_classes=10)  # layer4 is 1x1 at 32x32: BatchNorm needs 2 images
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    assert graph.groups and graph.has_mode_dependent_branches is False


def test_lineage_keeps_only_the_final_tensors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    graph = DependencyGraph(model, torch.randn(1, 3, 16, 16), protect_outputs=True)
    lineage = ParameterLineage()
    with lineage.recording(), torch.no_grad():
        for name in ("0", "3"):  # the middle conv loses input channels, then output channels
            module, handler = graph.group(name)._root
            graph._tp.get_pruning_group(module, handler, [0, 1]).prune()
    replacements = lineage.replacements(model)
    assert set(map(id, lineage._alive.values())) == {id(s.new) for s in replacements.values()}
    middle = replacements[next(p for p in replacements if p.shape == (8, 8, 3, 3))]
    assert [dim for dim, _ in middle.steps] == [1, 0] and middle.new.shape == (6, 6, 3, 3)
