"""BatchNorm re-estimation after pruning: exact statistics, state restored, and real accuracy recovered."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp
from lightning_prune.allocation import SensitivityAllocator
from lightning_prune.criteria import get
from lightning_prune.structure import DependencyGraph, FlopsModel

from .conftest import train_digits_cnn


def test_statistics_are_the_average_over_the_batches_and_modes_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    model[1].momentum = 0.3
    batches = [(torch.randn(8, 3, 5, 5) * (i + 1) + i, torch.zeros(8)) for i in range(3)]
    used = lp.recalibrate_batchnorm(model, batches)

    assert used == 3
    features = [model[0](x).detach() for x, _ in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.3 and not model.training and not model[2].training
    assert lp.recalibrate_batchnorm(nn.Linear(2, 2), batches) == 0  # nothing to do without BatchNorm
    with pytest.raises(ValueError, match="empty"):
        lp.recalibrate_batchnorm(model, [])


@pytest.fixture(scope="module")
def trained_digits_cnn():
    """The quick-start CNN trained for a few epochs on scikit-learn's digits (real data, no download)."""
    model, dm = train_digits_cnn(12, 64, 6, lambda params: torch.optim.Adam(params, lr=3e-3))
    train = DataLoader(dm.train_dataset, batch_size=64, shuffle=False)
    val = DataLoader(dm.val_dataset, batch_size=256)
    return model, train, val


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def test_one_shot_prune_recalibrates_and_recovers_accuracy(trained_digits_cnn):
    base, train, val = trained_digits_cnn
    assert accuracy(base, val) > 0.85
    x = next(iter(train))[0][:2]
    stale, fresh = copy.deepcopy(base), copy.deepcopy(base)
    lp.prune(stale, x, criterion="l1", amount=0.3)
    lp.prune(fresh, x, criterion="l1", amount=0.3, dataloader=train, recalibrate_batches=8)

    # Same channels removed, same weights: only the BatchNorm statistics differ.
    for (name, p), (_, q) in zip(stale.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
    assert accuracy(fresh, val) > accuracy(stale, val) + 0.1
    with pytest.raises(ValueError, match="dataloader"):
        lp.prune(copy.deepcopy(base), x, amount=0.3, recalibrate_batches=4)


def test_sensitivity_trials_recalibrate_and_leave_the_statistics_as_they_were(trained_digits_cnn):
    base, train, val = trained_digits_cnn
    model = copy.deepcopy(base)
    x = next(iter(train))[0][:2]
    graph = DependencyGraph(model, x)
    l1 = get("l1")
    scores = {g.name: l1.score(g) for g in graph.groups}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def recalibrate():
        calls.append(1)
        return lp.recalibrate_batchnorm(model, list(train)[:4])

    allocator = SensitivityAllocator(progress=False, recalibrate_batches=4)
    step = allocator.step(graph, scores, lambda: accuracy(model, val), FlopsModel(graph, x), recalibrate=recalibrate)
    assert step and len(calls) == 1 + len(allocator.last_step.trials)  # the baseline, then every trial
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    with pytest.raises(ValueError, match="recalibrate_batches"):
        SensitivityAllocator(recalibrate_batches=-1)
