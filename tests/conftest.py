"""Shared test set-up."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread is much faster on a 2-core CI machine than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The two import names of Lightning; the callback must behave the same under both.
LIGHTNING_NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


@pytest.fixture(params=LIGHTNING_NAMESPACES)
def lightning_ns(request):
    """``pytorch_lightning`` or ``lightning.pytorch`` (the unified package): a test using it runs under both."""
    return importlib.import_module(request.param)


def train_digits_cnn(image_size: int, batch_size: int, epochs: int, make_optimizer):
    """The quick-start CNN trained on scikit-learn's digits (real data, no download), seeded; returns the model in
    eval mode and its set-up datamodule."""
    from lightning_prune.datamodules import DigitsDataModule
    from lightning_prune.models import create_model

    torch.manual_seed(0)
    data = DigitsDataModule(image_size=image_size, batch_size=batch_size, seed=0)
    data.setup("fit")
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    optimizer = make_optimizer(model.parameters())
    model.train()
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval(), data


@pytest.fixture(scope="module")
def trained_digits():
    """A digits CNN trained for a few dozen steps (so trials differ), its validation split in batches of 16."""
    model, data = train_digits_cnn(8, 32, 3, lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    xs, ys = zip(*data.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]


@pytest.fixture
def fvcore_analyses(monkeypatch):
    """How many fvcore analyses are created (the real FlopCountAnalysis, counted): ``["n"]``."""
    import fvcore.nn

    counts = {"n": 0}
    original = fvcore.nn.FlopCountAnalysis

    class Counted(original):
        def __init__(self, *args, **kwargs):
            counts["n"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", Counted)
    return counts
