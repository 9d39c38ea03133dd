"""Weight criteria (L1, L2, FPGM, Fermat, BN scale) on hand-made weights with known answers, and the registry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_prune.criteria import (
    BNScale,
    Criterion,
    available,
    geometric_median,
    get,
    register,
    score_groups,
)
from lightning_prune.structure import DependencyGraph



def conv_model(filters: torch.Tensor, bn: bool = True) -> tuple[nn.Module, DependencyGraph]:
    """Conv(C_in→n, 1×1) [BN] ReLU Conv(n→2) pool Linear, with the first conv's filters set to ``filters``."""
    n, c_in = filters.shape
    layers = [nn.Conv2d(c_in, n, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(n))
    layers += [nn.ReLU(), nn.Conv2d(n, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[0].weight.copy_(filters[:, :, None, None])
    return model, DependencyGraph(model, torch.randn(2, c_in, 4, 4))


def test_l1_l2_order_filters_by_norm():
    filters = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.5, 0.0], [-2.0, 2.0]])
    model, graph = conv_model(filters)
    group = graph.group("0")
    l1 = get("l1").score(group)
    l2 = get("l2").score(group)
    assert torch.allclose(l1, torch.tensor([3.0, 2.0, 0.5, 4.0], dtype=torch.float64))
    assert torch.allclose(l2, filters.double().norm(dim=1))
    assert group.lowest(l1, 2) == [1, 2]  # L1: 2.0 and 0.5 are the smallest
    assert group.lowest(l2, 2) == [1, 2]
    # L1 and L2 need not agree on the top: [-2, 2] has the largest L1, [3, 0] the largest L2
    assert int(l1.argmax()) == 3 and int(l2.argmax()) == 0


def test_fpgm_gives_geometric_median_filter_the_lowest_score():
    # A centre filter surrounded symmetrically: it is the geometric median.
    filters = torch.tensor([[1.0, 1.0], [3.0, 1.0], [-1.0, 1.0], [1.0, 3.0], [1.0, -1.0]])
    _, graph = conv_model(filters)
    group = graph.group("0")
    fpgm = get("fpgm").score(group)
    expected = torch.cdist(filters.double(), filters.double()).sum(1)
    assert torch.allclose(fpgm, expected)
    assert group.lowest(fpgm, 1) == [0]
    fermat = get("fermat").score(group)
    assert group.lowest(fermat, 1) == [0]
    assert fermat[0] == pytest.approx(0.0, abs=1e-8)
    assert torch.allclose(fermat[1:], torch.full((4,), 2.0, dtype=torch.float64), atol=1e-8)


def test_geometric_median_matches_numerical_optimum():
    from scipy.optimize import minimize

    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0], [5.0, 4.0], [2.0, 2.5]], dtype=torch.float64)
    median = geometric_median(points)
    objective = lambda g: np.linalg.norm(points.numpy() - g, axis=1).sum()  # noqa: E731
    best = minimize(objective, points.mean(0).numpy(), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    assert objective(median.numpy()) <= best.fun + 1e-8
    # deterministic
    assert torch.equal(geometric_median(points), median)
    # a median sitting on a data point (Vardi-Zhang case) is handled: majority at one point
    stacked = torch.tensor([[1.0, 1.0]] * 5 + [[10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    assert torch.allclose(geometric_median(stacked), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6)


def test_fermat_and_fpgm_on_a_coupled_group_use_all_producers():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 1, bias=False)
            self.b = nn.Conv2d(2, 3, 1, bias=False)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.a(x) + self.b(x))).mean((2, 3))

    torch.manual_seed(0)
    model = Residual().eval()
    graph = DependencyGraph(model, torch.randn(2, 2, 4, 4))
    group = graph.group("a")
    filters = torch.cat([model.a.weight.reshape(3, -1), model.b.weight.reshape(3, -1)], 1).double()
    assert torch.allclose(group.filters().double(), filters)
    assert torch.allclose(get("fpgm").score(group), torch.cdist(filters, filters).sum(1))
    assert torch.allclose(get("fermat").score(group), (filters - geometric_median(filters)).norm(dim=1))


def test_bn_scale_ranks_by_abs_gamma_and_errors_without_bn():
    filters = torch.eye(3)
    model, graph = conv_model(filters)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    group = graph.group("0")
    scores = get("bn_scale").score(group)
    assert torch.allclose(scores, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    assert group.lowest(scores, 1) == [0]

    _, plain = conv_model(filters, bn=False)
    with pytest.raises(ValueError, match=r"bn_scale.*group '0'"):
        get("bn_scale").score(plain.group("0"))
    fallback = BNScale(fallback="l1").score(plain.group("0"))
    assert torch.allclose(fallback, get("l1").score(plain.group("0")))


def test_score_groups_with_weight_criteria_needs_no_data():
    model, graph = conv_model(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    scores = score_groups(model, graph, "l2")
    assert set(scores) == {g.name for g in graph.groups}
    for g in graph.groups:
        assert scores[g.name].shape == (g.size,)


def test_random_is_seeded():
    _, graph = conv_model(torch.randn(4, 3))
    group = graph.group("0")
    assert torch.equal(get("random", seed=3).score(group), get("random", seed=3).score(group))
    assert not torch.equal(get("random", seed=3).score(group), get("random", seed=4).score(group))


def test_registry_lists_and_rejects_names():
    names = available()
    for expected in ("l1", "l2", "fpgm", "fermat", "bn_scale", "taylor", "apoz", "activation_mean", "hrank", "tt",
                     "snr", "fdr", "sd", "blend", "+variety"):
        assert expected in names
    with pytest.raises(ValueError, match=r"criterion='l3'.*accepted values:.*'l1'.*'sd'"):
        get("l3")
    with pytest.raises(ValueError, match=r"criterion='l1\+varity'.*accepted values:.*'\+variety'.*Did you mean"):
        get("l1+varity")
    with pytest.raises(ValueError, match="criterion"):
        get(3)  # type: ignore[arg-type]
    assert get("L1+Variety").name == "l1+variety"
    with pytest.raises(ValueError, match="combine"):
        get("l1", combine="median")


def test_custom_criterion_registers():
    @register("test_negative_l1")
    class NegativeL1(Criterion):
        name = "test_negative_l1"

        def score(self, group):
            return -get("l1").score(group)

    _, graph = conv_model(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert "test_negative_l1" in available()
    assert graph.group("0").lowest(get("test_negative_l1").score(graph.group("0")), 1) == [1]


def test_coupled_scores_keep_the_criterion_scale():
    """Global allocation compares groups with one threshold: a coupled group's combined scores must stay on the
    criterion's scale (like a single-layer group's), while members still count equally within the group."""
    from lightning_prune.criteria import combine_scores

    wide = torch.tensor([1.0, 2.0, 3.0, 6.0]) * 10.0
    narrow = torch.tensor([5.0, 3.0, 2.0, 1.0]) * 0.1
    combined = combine_scores([wide, narrow])
    balanced = (wide / wide.abs().mean() + narrow / narrow.abs().mean()) / 2
    assert torch.equal(combined.argsort(), balanced.double().argsort())
    assert float(combined.abs().mean()) == pytest.approx(float(wide.abs().mean() + narrow.abs().mean()) / 2)
    assert torch.equal(combine_scores([wide]), wide.double())  # a single member keeps its raw scores


def test_normalized_wrapper_makes_global_allocation_scale_free():
    """Raw L1 norms grow with a filter's fan-in (at Kaiming init as √d), so one global threshold strips the
    narrow-fan-in stage-1 groups first; ``+normalized`` divides each group's scores by their mean, which keeps
    every ranking inside a group and spreads the global cut evenly."""
    from lightning_prune.allocation import allocate
    from lightning_prune.criteria import available, get
    from lightning_prune.models import create_model
    from lightning_prune.structure import DependencyGraph

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    graph = DependencyGraph(model, torch.randn(2, 3, 32, 32))
    raw, normalized = get("l1"), get("l1+normalized")
    assert "+normalized" in available() and normalized.name == "l1+normalized"
    for group in graph.groups:
        r, n = raw.score(group), normalized.score(group)
        assert torch.equal(r.argsort(), n.argsort())
        assert float(n.abs().mean()) == pytest.approx(1.0)

    def pruned_fraction(criterion, stage: str) -> float:
        scores = {g.name: criterion.score(g) for g in graph.groups}
        removals = allocate(graph, scores, 0.3, allocation="global")
        groups = [g for g in graph.groups if g.name.startswith(stage)]
        return sum(len(removals.get(g.name, [])) for g in groups) / sum(g.size for g in groups)

    assert pruned_fraction(raw, "layer1.") > 0.6 and pruned_fraction(raw, "layer3.") < 0.25
    for stage in ("layer1.", "layer2.", "layer3."):
        assert abs(pruned_fraction(normalized, stage) - 0.3) < 0.15

    taylor = get("taylor+normalized")  # the data-driven protocol is forwarded to the base
    assert taylor.requires_data and taylor.requires_gradients and not get("l1+normalized").requires_data
