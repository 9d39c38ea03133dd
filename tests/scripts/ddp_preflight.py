"""A 2-process CPU (gloo) fit whose fit-start checks fail on rank 1 only; run by tests/test_preflight.py.

Every rank writes ``--out``/rank<r>.txt: the error it raised and how many training batches it started."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callbacks import PruneCallback


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CountBatches(pl.Callback):
    batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        CountBatches.batches += 1


def rank_one_only(batch):
    """A batch_fn that only rank 1 cannot apply (as with data that differs per rank)."""
    if os.environ.get("LOCAL_RANK", "0") == "1":
        raise ValueError("batch_fn: rank-local failure")
    return batch[0], batch[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         callbacks=[PruneCallback(amount=0.5, epochs=[1], batch_fn=rank_one_only), CountBatches()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out))
    rank = os.environ.get("LOCAL_RANK", "0")
    try:
        trainer.fit(Net(), DataLoader(data, batch_size=4))
        error = "none"
    except ValueError as caught:
        error = str(caught)
    (out / f"rank{rank}.txt").write_text(f"{CountBatches.batches}\n{error}\n")


if __name__ == "__main__":
    main()
