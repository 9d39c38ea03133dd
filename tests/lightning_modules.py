"""User-style LightningModules and data, one per Lightning import name.

A ``lightning.pytorch`` Trainer rejects a ``pytorch_lightning`` LightningModule (and does not take a
``pytorch_lightning`` LightningDataModule as its datamodule), and the package's ``ClassificationModule`` and
datamodules are ``pytorch_lightning`` classes. A user of ``lightning.pytorch`` writes their own module, as here,
and may use the package's datamodules for their dataloaders. Module-level classes, so ``ddp_spawn`` can pickle
them.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch
import pytorch_lightning
import torch
import torch.nn.functional as F

from lightning_prune.classification import EpochLRSchedule
from lightning_prune.datamodules import DigitsDataModule
from lightning_prune.models import create_model

IMAGE = 12


class _DigitsClassifier:
    """A small digits classifier as a user writes it: a network in ``self.model``, cross-entropy, SGD (or AdamW)
    with a per-epoch cosine schedule. ``compile_backend`` compiles the network in ``__init__``."""

    def __init__(self, model: str = "digits_cnn", num_classes: int = 10, in_channels: int = 1, lr: float = 0.05,
                 optimizer: str = "sgd", scheduler: str = "cosine", image: int = IMAGE,
                 compile_backend: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=num_classes, in_channels=in_channels)
        if compile_backend is not None:
            self.model = torch.compile(self.model, backend=compile_backend)
        self.example_input_array = torch.zeros(2, in_channels, image, image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = F.cross_entropy(self(images), targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, targets), batch_size=len(images))
        self.log("val/acc", (logits.argmax(1) == targets).float().mean(), batch_size=len(images))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=5e-4)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=5e-4)
        if hp.scheduler == "none":
            return optimizer
        schedule = EpochLRSchedule(hp.scheduler, int(self.trainer.max_epochs), 0)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)}


class PLDigitsClassifier(_DigitsClassifier, pytorch_lightning.LightningModule):
    pass


class LDigitsClassifier(_DigitsClassifier, lightning.pytorch.LightningModule):
    pass


MODULES = {"pytorch_lightning": PLDigitsClassifier, "lightning.pytorch": LDigitsClassifier}


def module_class(ns: Any) -> type:
    """The user-style module class of namespace ``ns`` (the imported module or its name)."""
    return MODULES[ns if isinstance(ns, str) else ns.__name__]


def digits(batch_size: int = 64) -> DigitsDataModule:
    dm = DigitsDataModule(image_size=IMAGE, batch_size=batch_size, seed=0)
    dm.setup("fit")
    return dm


def fit_data(ns: Any, dm: DigitsDataModule) -> dict[str, Any]:
    """``trainer.fit`` data arguments: the datamodule itself under ``pytorch_lightning``, its dataloaders under
    ``lightning.pytorch`` (whose Trainer takes only its own LightningDataModule class)."""
    name = ns if isinstance(ns, str) else ns.__name__
    if name == "pytorch_lightning":
        return {"datamodule": dm}
    return {"train_dataloaders": dm.train_dataloader(), "val_dataloaders": dm.val_dataloader()}
