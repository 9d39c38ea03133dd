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
