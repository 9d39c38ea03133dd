"""fvcore's count without fvcore's trace (structure/flop_counting.py): equal to fvcore, module by module, wherever
it answers, and it hands over to fvcore wherever it cannot be exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lightning_prune as lp
from lightning_prune.structure import DependencyGraph, count_flops
from lightning_prune.structure.flop_counting import FvcoreRules

from .zoo import ZOO, build


def _rules_count(model: nn.Module, x: torch.Tensor) -> tuple[dict | None, str | None]:
    model.eval()
    rules = FvcoreRules(model)
    with torch.no_grad(), rules.active():
        model(x)
    return rules.result(), rules.unverified


def _assert_equal_by_module(model: nn.Module, x: torch.Tensor) -> None:
    fvcore_counts = count_flops(model, x, per_module=True, backend="fvcore")
    ours, why = _rules_count(model, x)
    assert why is None, f"unexpectedly unverified: {why}"
    assert ours[""] == fvcore_counts[""] > 0
    different = {name: (fvcore_counts.get(name, 0), ours.get(name, 0))
                 for name in set(fvcore_counts) | set(ours) if fvcore_counts.get(name, 0) != ours.get(name, 0)}
    assert not different, f"per-module counts differ (fvcore, ours): {list(different.items())[:5]}"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_equals_fvcore_module_by_module_on_the_zoo(name):
    model, x = build(name)
    _assert_equal_by_module(model, x[:1])


@pytest.mark.parametrize("name", ["inception_v3", "swin_t", "squeezenet1_0", "mnasnet0_5", "regnet_y_400mf",
                                  "resnext50_32x4d", "vgg11_bn", "alexnet"])
def test_equals_fvcore_on_more_torchvision_families(name):
    kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    size = {"inception_v3": 75, "alexnet": 63}.get(name, 32)
    _assert_equal_by_module(model, torch.randn(1, 3, size, size))


class Functional(nn.Module):
    """Every op family fvcore counts, called functionally from ``forward`` and through modules, with the
    argument forms that change fvcore's rule (no affine, batch statistics in eval, transposed/grouped conv,
    interpolation modes, matrix products)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.bn_plain = nn.BatchNorm2d(4, affine=False)
        self.bn_batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.weight = nn.Parameter(torch.randn(6, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.grouped(self.conv(x))
        x = self.up(x)
        x = self.inorm(self.gn(self.bn_batch_stats(self.bn_plain(x))))
        x = F.interpolate(x, scale_factor=0.5, mode="nearest") + F.interpolate(x, scale_factor=0.5, mode="area")
        x = self.upsample(x)
        x = F.layer_norm(x, x.shape[-2:])
        x = F.batch_norm(x, torch.zeros(4), torch.ones(4), training=False)
        pooled = F.adaptive_avg_pool2d(x, (2, 2)).flatten(1)  # [1, 16]
        tokens = pooled.reshape(1, 4, 4)
        attention = torch.bmm(tokens, tokens.transpose(1, 2)) @ tokens  # bmm and a batched matmul
        mixed = torch.addmm(torch.zeros(1, 6), pooled, self.weight.t()) + torch.mm(pooled, self.weight.t())
        return self.head(pooled + attention.flatten(1)) + F.linear(pooled, self.weight).sum(1, keepdim=True), mixed


def test_equals_fvcore_on_functional_ops_and_argument_forms():
    torch.manual_seed(0)
    _assert_equal_by_module(Functional(), torch.randn(1, 3, 16, 16))


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return torch.einsum("bcn,bdn->bcd", y, y)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens)[0]


@pytest.mark.parametrize("model_type", [Einsum, Attention])
def test_unknown_python_level_ops_hand_over_to_fvcore(model_type):
    """``torch.einsum`` and attention helpers run counted ops inside Python code the rules do not see: the rules
    refuse to answer (naming the call) and ``count_flops`` gives fvcore's own count."""
    torch.manual_seed(0)
    model, x = model_type(), torch.randn(1, 3, 16, 16)
    counted, why = _rules_count(model, x)
    assert counted is None and why is not None
    assert count_flops(model, x) == count_flops(model, x, backend="fvcore") > 0


def test_count_flops_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        count_flops(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), backend="jit")


@pytest.mark.parametrize("batch", [1, 4])
def test_a_prune_event_never_traces_with_fvcore(batch, fvcore_analyses):
    """The graph's reference forward counts the FLOPs (one sample) or count_flops applies the rules (a batch):
    the event reports fvcore's numbers without fvcore's trace."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    dense = count_flops(model, x, backend="fvcore")
    fvcore_analyses["n"] = 0
    report = lp.prune(model, x, criterion="l2", flops_reduction=0.4)
    assert fvcore_analyses["n"] == 0
    assert report.flops_before == dense
    assert report.flops_after == count_flops(model, x, backend="fvcore")


def test_graph_keeps_the_reference_forward_count_only_for_one_sample():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    one = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    assert one._flops_count_cache[1] == count_flops(model, one.example_inputs, per_module=True, backend="fvcore")
    batch = DependencyGraph(model, torch.randn(2, 3, 32, 32))
    assert getattr(batch, "_flops_count_cache", None) is None  # counted later, on the first sample
