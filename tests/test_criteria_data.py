"""Data-driven criteria and the scoring driver: known answers, streaming, DDP-style state reduction, degenerate
data, and side effects (parameter grads, train/eval modes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.criteria import get, score_groups
from lightning_prune.structure import DependencyGraph

DATA_CRITERIA = ("taylor", "apoz", "activation_mean", "hrank", "tt", "snr", "fdr", "sd")
DISCRIMINATION = ("tt", "snr", "fdr", "sd")



def identity_model(channels: int = 3, classes: int = 3) -> tuple[nn.Module, DependencyGraph]:
    """Conv1×1 (identity) → ReLU → Conv1×1 → ReLU → global pool → Linear: group ``"0"`` is fed to conv ``"2"``
    as ``relu(x)``, so the activations it is scored on are the inputs we craft."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(channels, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    ).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(channels)[:, :, None, None])
    return model, DependencyGraph(model, torch.randn(2, channels, 4, 4))


def discriminative_data(n_per_class: int = 20, classes: int = 3, seed: int = 0):
    """Channel 0 separates the classes perfectly, channel 1 is pure noise, channel 2 separates them weakly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    n = labels.numel()
    x = torch.empty(n, 3, 4, 4)
    x[:, 0] = 1.0 + 3.0 * labels[:, None, None] + 0.05 * torch.randn(n, 4, 4, generator=g)
    x[:, 1] = 1.0 + torch.rand(n, 4, 4, generator=g)
    x[:, 2] = 1.0 + 0.3 * labels[:, None, None] + torch.rand(n, 4, 4, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], labels[perm]


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def reference_discrimination(values: torch.Tensor, labels: torch.Tensor, statistic: str) -> float:
    """Straight from the formulas of paper 2 on stored activations ``[N, HW]`` (one channel)."""
    ridge = 0.05 if statistic == "sd" else 1e-4
    out = []
    for c in labels.unique():
        p, q = values[labels == c].double(), values[labels != c].double()
        mp, mq = p.mean(), q.mean()
        vp, vq = p.var(unbiased=False), q.var(unbiased=False)
        n_p, n_q = p.shape[0], q.shape[0]
        if statistic == "tt":
            out.append(abs(mp - mq) / (vp / n_p + vq / n_q + ridge).sqrt())
        elif statistic == "snr":
            out.append(abs(mp - mq) / (vp.sqrt() + vq.sqrt() + ridge))
        elif statistic == "fdr":
            out.append((mp - mq) ** 2 / (vp + vq + ridge))
        else:
            out.append(0.5 * (vp / (vq + ridge) + vq / (vp + ridge)) + 0.5 * (mp - mq) ** 2 / (vp + vq + ridge) - 1)
    return float(torch.stack(out).mean())


@pytest.mark.parametrize("name", DISCRIMINATION)
def test_class_discrimination_known_answer(name):
    model, graph = identity_model()
    x, y = discriminative_data()
    scores = score_groups(model, [graph.group("0")], name, batches(x, y, 16))["0"]
    assert int(scores.argmax()) == 0, scores  # perfect separator on top
    assert int(scores.argmin()) == 1, scores  # pure noise at the bottom
    for k in range(3):
        expected = reference_discrimination(x[:, k].reshape(len(x), -1), y, name)
        assert float(scores[k]) == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_streaming_equals_one_batch_and_state_halves_sum(name):
    model, graph = identity_model()
    x, y = discriminative_data(n_per_class=8)
    groups = graph.groups
    one = score_groups(model, groups, name, [(x, y)])
    many = score_groups(model, groups, name, batches(x, y, 5))
    for key in one:
        assert torch.allclose(one[key], many[key], rtol=1e-5, atol=1e-9), (key, one[key], many[key])

    # DDP: statistics of two shards summed == statistics of all the data
    criterion = get(name)
    score_groups(model, groups, criterion, batches(x[:10], y[:10], 4))
    first = {k: v.clone() for k, v in criterion.state().items()}
    summed = score_groups(model, groups, criterion, batches(x[10:], y[10:], 4),
                          reduce_state=lambda state: {k: v + first[k] for k, v in state.items()})
    full = get(name)
    score_groups(model, groups, full, [(x, y)])
    assert set(full.state()) == set(criterion.state())
    for key, value in full.state().items():
        assert torch.allclose(value, criterion.state()[key], rtol=1e-5, atol=1e-8), key
    for key in one:
        assert torch.allclose(summed[key], one[key], rtol=1e-5, atol=1e-9)


def test_scoring_batches_limits_the_data():
    model, graph = identity_model()
    x, y = discriminative_data(n_per_class=8)
    data = batches(x, y, 6)
    limited = score_groups(model, graph, "activation_mean", data, scoring_batches=1)
    first = score_groups(model, graph, "activation_mean", data[:1])
    assert all(torch.equal(limited[k], first[k]) for k in first)
    with pytest.raises(ValueError, match="scoring_batches"):
        score_groups(model, graph, "activation_mean", data, scoring_batches=0)


def test_apoz_activation_mean_and_hrank_known_answers():
    model, graph = identity_model()
    g = torch.Generator().manual_seed(1)
    n = 6
    x = torch.empty(n, 3, 4, 4)
    u, v = torch.rand(n, 4, 1, generator=g) + 0.5, torch.rand(n, 1, 4, generator=g) + 0.5
    x[:, 0] = u @ v  # rank-1 positive maps
    x[:, 1] = torch.rand(n, 4, 4, generator=g) + 0.1  # full-rank positive maps
    x[:, 2] = -1.0  # dead after ReLU
    x[:3, 2, 0, :2] = 2.0  # ... except two pixels of the first three images
    y = torch.zeros(n, dtype=torch.long)
    group = [graph.group("0")]
    apoz = score_groups(model, group, "apoz", [(x, y)])["0"]
    assert torch.allclose(apoz, torch.tensor([1.0, 1.0, 6 / 96], dtype=torch.float64))
    mean = score_groups(model, group, "activation_mean", [(x, y)])["0"]
    assert torch.allclose(mean, torch.relu(x).mean((0, 2, 3)).double(), rtol=1e-6)
    hrank = score_groups(model, group, "hrank", [(x, y)])["0"]
    assert torch.allclose(hrank, torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64))


def test_taylor_known_answer_and_dead_consumer():
    model, graph = identity_model()
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0  # channel 1 is read by nobody: zero gradient, zero Taylor score
    x, y = discriminative_data(n_per_class=4)
    scores = score_groups(model, [graph.group("0")], "taylor", [(x, y)])["0"]
    assert scores[1] == 0.0 and scores[0] > 0 and scores[2] > 0
    # reference: |mean_spatial(a * dL/da)| averaged over samples, with L the summed cross-entropy
    a = torch.relu(x).requires_grad_()
    tail = nn.Sequential(*list(model)[2:])
    loss = nn.functional.cross_entropy(tail(a), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, a)
    expected = (a * grad).mean((2, 3)).abs().mean(0).double()
    assert torch.allclose(scores, expected.detach(), rtol=1e-5, atol=1e-10)


def test_flatten_linear_consumer_is_reordered_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0])[:, None, None, None])
    graph = DependencyGraph(model, torch.randn(2, 1, 4, 4))
    group = graph.group("0")
    assert [m.module_name for m in group.consumers] == ["4"]
    x = torch.rand(5, 1, 4, 4) + 0.1
    scores = score_groups(model, [group], "activation_mean", [(x, torch.zeros(5, dtype=torch.long))])["0"]
    pooled = nn.functional.adaptive_avg_pool2d(x, 2).mean()
    assert torch.allclose(scores, pooled.double() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rtol=1e-5)
    assert int(scores.argmax()) == 2


@pytest.mark.parametrize("name", DISCRIMINATION)
def test_degenerate_data_gives_finite_scores(name):
    model, graph = identity_model()
    group = [graph.group("0")]
    x, y = discriminative_data(n_per_class=6)
    # constant channel and zero variance within classes
    x[:, 1] = 2.0
    x[:, 2] = 1.0 + y[:, None, None].float()
    scores = score_groups(model, group, name, [(x, y)])["0"]
    assert torch.isfinite(scores).all()
    if name != "sd":
        assert scores[1] == pytest.approx(0.0, abs=1e-6)  # no mean difference
    # an absent class (declared but never seen) is left out of the mean
    declared = score_groups(model, group, get(name, num_classes=5), [(x, y)])["0"]
    assert torch.allclose(declared, scores)
    # a single class: no one-vs-rest comparison exists, every score is 0
    single = score_groups(model, group, name, [(x[y == 1], y[y == 1])])["0"]
    assert torch.equal(single, torch.zeros(3, dtype=torch.float64))
    # all images identical: zero variance everywhere
    same = score_groups(model, group, name, [(x[:1].repeat(len(x), 1, 1, 1), y)])["0"]
    assert torch.isfinite(same).all()


def test_growing_classes_across_batches_matches_declared_num_classes():
    model, graph = identity_model()
    x, y = discriminative_data(n_per_class=5)
    order = torch.argsort(y)  # first batches see only class 0, later ones grow the buffers
    data = batches(x[order], y[order], 4)
    grown = score_groups(model, graph, "sd", data)
    declared = score_groups(model, graph, get("sd", num_classes=3), data)
    assert all(torch.allclose(grown[k], declared[k]) for k in grown)
    with pytest.raises(ValueError, match="num_classes=2"):
        score_groups(model, graph, get("sd", num_classes=2), data)


def test_scoring_leaves_grads_and_modes_untouched():
    model, graph = identity_model()
    model.train()
    model[1].eval()  # a mixed configuration must come back exactly
    marker = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = marker.clone()
    modes = [m.training for m in model.modules()]
    x, y = discriminative_data(n_per_class=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("taylor", "sd", "hrank"):
        score_groups(model, graph, name, batches(x, y, 5))
    assert torch.equal(model[2].weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "2.weight")
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # also when scoring fails midway
    with pytest.raises(ValueError):
        score_groups(model, graph, "sd", [x[:4]])  # bare tensors: no labels
    assert [m.training for m in model.modules()] == modes
    assert not model[2]._forward_pre_hooks


def test_input_errors_name_the_parameter():
    model, graph = identity_model()
    x, y = discriminative_data(n_per_class=2)
    with pytest.raises(ValueError, match=r"dataloader.*'taylor'"):
        score_groups(model, graph, "taylor")
    with pytest.raises(ValueError, match=r"'sd' needs class labels"):
        score_groups(model, graph, "sd", [x])
    with pytest.raises(ValueError, match=r"'taylor' needs class labels.*default loss"):
        score_groups(model, graph, "taylor", [x])
    # a bare tensor is fine for a criterion that needs no labels; a loss_fn without labels too
    assert score_groups(model, graph, "apoz", [x])["0"].shape == (3,)
    out = score_groups(model, graph, "taylor", [x], loss_fn=lambda outputs, labels: outputs.pow(2).sum())
    assert torch.isfinite(out["0"]).all()
    # dict batches
    dict_scores = score_groups(model, graph, "sd", [{"image": x, "target": y}])
    assert torch.allclose(dict_scores["0"], score_groups(model, graph, "sd", [(x, y)])["0"])
    with pytest.raises(ValueError, match="batch_fn"):
        score_groups(model, graph, "apoz", [{"pixels": x}])
    with pytest.raises(ValueError, match="no batches"):
        score_groups(model, graph, "apoz", [])
    with pytest.raises(ValueError, match="score_groups"):
        get("apoz").score(graph.group("0"))


def test_residual_group_is_scored_at_every_consumer_site():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(x + self.conv(x))
            return self.head(x).mean((2, 3))

    torch.manual_seed(0)
    model = Block().eval()
    graph = DependencyGraph(model, torch.randn(2, 1, 6, 6))
    group = graph.group("stem")
    assert sorted(m.module_name for m in group.consumers) == ["conv", "head"]
    x, y = torch.randn(6, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    criterion = get("taylor")
    scores = score_groups(model, [group], criterion, [(x, y)])
    assert {k.split("|")[1] for k in criterion.state()} == {"conv", "head"}
    assert torch.isfinite(scores["stem"]).all() and scores["stem"].shape == (4,)
