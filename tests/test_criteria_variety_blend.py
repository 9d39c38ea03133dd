"""Filter variety (paper 4) and criteria blending (paper 3)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_prune.criteria import Blend, Variety, get, score_groups
from lightning_prune.criteria.variety import variety_transform
from lightning_prune.structure import DependencyGraph



def model_with_filters(filters: torch.Tensor) -> tuple[nn.Module, DependencyGraph]:
    n, c_in = filters.shape
    model = nn.Sequential(nn.Conv2d(c_in, n, 1, bias=False), nn.ReLU(), nn.Conv2d(n, 3, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(filters[:, :, None, None])
    return model, DependencyGraph(model, torch.randn(2, c_in, 4, 4))


# Two identical filters (0, 1), a rare low-norm filter (2), and a strong distinct one (3).
DUPLICATES = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 3.0, 0.0, 0.0]])


def test_variety_removes_a_duplicate_where_l1_removes_the_rare_filter():
    _, graph = model_with_filters(DUPLICATES)
    group = graph.group("0")
    assert group.lowest(get("l1").score(group), 1) == [2]
    variety = get("l1+variety")
    scores = variety.score(group)
    assert group.lowest(scores, 1) == [1]  # a duplicate; its twin (lower index on the tie) is protected
    assert group.lowest(scores, 2) == [1, 2]  # candidates ran out: fall back to L1 among the rest
    # protected channels keep their base score
    assert torch.allclose(scores[[0, 2, 3]], get("l1").score(group)[[0, 2, 3]])
    assert isinstance(variety, Variety) and variety.name == "l1+variety"


def test_variety_transform_tiers_preserve_base_order():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])
    labels = [1, 1, 1, 2, 2, 3]  # cluster 1: best 0; cluster 2: best 4; cluster 3: singleton 5
    out = variety_transform(scores, labels=torch.tensor(labels).numpy())
    order = torch.argsort(out).tolist()
    assert order == [1, 3, 2, 5, 4, 0]  # candidates 1 < 3 < 2 first, then protected by base score
    assert torch.equal(out[[0, 4, 5]], scores[[0, 4, 5]].double())


def test_variety_threshold_and_n_clusters():
    _, graph = model_with_filters(DUPLICATES)
    group = graph.group("0")
    # threshold 0: only exact duplicates merge; n_clusters=4: every channel alone (nothing protected differently)
    assert len(set(Variety("l1", threshold=0.0).labels(group))) == 3
    alone = Variety("l1", n_clusters=4).score(group)
    assert torch.allclose(alone, get("l1").score(group))
    assert len(set(Variety("l1", n_clusters=0.5).labels(group))) == 2
    with pytest.raises(ValueError, match="similarity"):
        Variety("l1", similarity="gradients")
    with pytest.raises(ValueError, match="threshold"):
        Variety("l1", threshold=1.5)


def test_variety_forwards_the_data_protocol_and_supports_activation_similarity():
    model, graph = model_with_filters(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    x, y = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    wrapped = Variety(get("taylor"))
    assert wrapped.requires_data and wrapped.requires_gradients and not wrapped.requires_labels
    plain = get("taylor")
    base_scores = score_groups(model, graph, plain, [(x, y)])
    scores = score_groups(model, graph, wrapped, [(x, y)])
    assert set(wrapped.state()) == set(plain.state())
    for name in scores:
        protected = ~(scores[name] < base_scores[name])
        assert torch.allclose(scores[name][protected], base_scores[name][protected])

    # similarity of feature maps: channels 0 and 1 produce proportional maps
    filters = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    model, graph = model_with_filters(filters)
    by_maps = Variety("l1", similarity="activations")
    assert by_maps.requires_data
    out = score_groups(model, graph, by_maps, [(x, y)])
    assert graph.group("0").lowest(out["0"], 1) == [0]  # the weaker of the two proportional maps
    assert any(k.startswith("variety|") for k in by_maps.state())


def quadrant_data(n: int, seed: int):
    """Four classes: a bright 3×3 blob in one of the four quadrants of a noisy 6×6 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 6, 6, generator=g)
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, 0, 3 * r:3 * r + 3, 3 * s:3 * s + 3] += 1.0
    return x, y


def _fitness_setup(seed: int = 1):
    """A small CNN trained for a few steps; fitness = accuracy on held-out batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )
    x, y = quadrant_data(128, seed)
    optimizer = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    graph = DependencyGraph(model, torch.randn(2, 1, 6, 6))
    held_x, held_y = quadrant_data(64, seed + 100)

    def evaluate() -> float:
        with torch.no_grad():
            return float((model(held_x).argmax(1) == held_y).float().mean())

    return model, graph, x, y, evaluate


def _single_fitness(graph, evaluate, criterion, counts):
    removals = {g.name: g.lowest(criterion.score(g), counts[g.name]) for g in graph.groups if g.name in counts}
    with graph.masked(removals):
        return evaluate()


def test_blend_search_is_reproducible_and_never_worse_than_its_best_member():
    model, graph, x, target, evaluate = _fitness_setup()
    counts = {g.name: 5 for g in graph.groups}
    pool = ["l1", "fpgm", "bn_scale", "random", "activation_mean"]
    data = [(x[:32], target[:32])]

    def run():
        blend = Blend(pool, population=8, generations=3, seed=3, progress=False)
        score_groups(model, graph, blend, data)
        return blend, blend.search(graph, evaluate, counts)

    blend, result = run()
    _, again = run()
    assert result.alphas == again.alphas and result.history == again.history
    assert result.best_fitness == again.best_fitness
    singles = {}
    for name, member in zip(blend.member_names, blend.members):
        singles[name] = _single_fitness(graph, evaluate, member, counts)
        assert result.initial_fitness[name] == pytest.approx(singles[name])
    assert len(set(singles.values())) > 2  # the members really differ on this fitness set
    assert result.best_fitness >= max(singles.values())
    assert result.best_fitness >= result.initial_fitness["equal"]
    assert result.history == sorted(result.history)  # elitism: the best never gets worse
    # score() now uses the best alphas: pruning with it reproduces the best fitness
    assert _single_fitness(graph, evaluate, blend, counts) == pytest.approx(result.best_fitness)
    assert all(abs(sum(a.values()) - 1) < 1e-9 and min(a.values()) >= 0 for a in result.alphas.values())
    assert all(m.training is False for m in model.modules())


def test_blend_clusters_similar_criteria_and_uses_equal_weights_before_search():
    _, graph, *_ = _fitness_setup()
    group = graph.group("3")
    blend = Blend(["l1", "l2", "random"], progress=False)
    ranks = blend.member_ranks(group)
    assert blend.representatives(ranks) == ["l1", "random"]  # l1 and l2 rank these filters alike
    expected = (torch.as_tensor(ranks["l1"]) + torch.as_tensor(ranks["random"])) / 2
    assert torch.allclose(blend.score(group), expected.double())
    # with a zero threshold every criterion stays its own candidate unless rankings are identical
    subset = {k: ranks[k] for k in ("l1", "random")}
    assert Blend(["l1", "random"], cluster_threshold=0.0).representatives(subset) == ["l1", "random"]


def test_blend_forwards_the_data_protocol_and_composes_with_variety():
    model, graph, x, target, evaluate = _fitness_setup()
    blend = Blend(["l1", "taylor", "sd"], progress=False)
    assert blend.requires_data and blend.requires_gradients and blend.requires_labels
    scores = score_groups(model, graph, blend, [(x[:16], target[:16])])
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert {k.split("/")[0] for k in blend.state()} == {"1", "2"}
    # state round trip through a (DDP-style) reduction
    state = blend.state()
    blend.load_state({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(scores[g.name], blend.score(g)) for g in graph.groups)
    wrapped = Variety(Blend(["l1", "activation_mean"], progress=False))
    out = score_groups(model, graph, wrapped, [(x[:16], target[:16])])
    assert all(s.shape == (g.size,) for g, s in zip(graph.groups, out.values()))
    assert get("blend", criteria=["l1", "l2"], progress=False).member_names == ["l1", "l2"]


def test_blend_search_time_limit_and_progress(caplog):
    model, graph, x, target, evaluate = _fitness_setup()
    counts = {g.name: 2 for g in graph.groups}
    blend = Blend(["l1", "fpgm"], population=50, generations=100, time_limit_s=0.0, progress=False)
    result = blend.search(graph, evaluate, counts)
    assert result.evaluations == 1  # the equal-weights individual, then out of time
    with pytest.raises(ValueError, match="removal_counts: group 'nope' is not a prunable group"):
        blend.search(graph, evaluate, {"nope": 1})
    with caplog.at_level(logging.INFO, logger="lightning_prune.criteria.blend"):
        shown = Blend(["l1", "fpgm"], population=3, generations=1, progress=True).search(graph, evaluate, counts)
    assert "generation 1/1" in caplog.text and len(shown.history) == 2
