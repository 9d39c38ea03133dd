"""The image-classification LightningModule that the pruning callbacks operate on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .models import create_model

__all__ = ["OPTIMIZERS", "SCHEDULERS", "ClassificationModule", "EpochLRSchedule"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")


class EpochLRSchedule:
    """Learning-rate multiplier per epoch, for ``torch.optim.lr_scheduler.LambdaLR``.

    ``"cosine"``: ``0.5 * (1 + cos(pi * e / total_epochs))`` -- the same curve as
    ``CosineAnnealingLR(T_max=total_epochs, eta_min=0)``. ``"step"``: ``0.1`` at 50 % and again
    at 75 % of ``total_epochs`` (the classic CIFAR recipe). ``e`` is counted from the start of
    training: ``start_epoch`` is the trainer's epoch when the optimizer was built, so a schedule
    rebuilt mid-training (e.g. after channels were pruned and the optimizer re-created)
    continues where the old one was instead of restarting. ``LambdaLR`` checkpoints this
    object's attributes, so resuming restores ``start_epoch`` too.
    """

    def __init__(self, kind: str, total_epochs: int, start_epoch: int = 0) -> None:
        if kind not in ("cosine", "step"):
            raise ValueError(f"kind must be 'cosine' or 'step', got {kind!r}")
        self.kind = kind
        self.total_epochs = total_epochs
        self.start_epoch = start_epoch

    def __call__(self, epoch: int) -> float:
        elapsed = min(epoch + self.start_epoch, self.total_epochs)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * elapsed / self.total_epochs))
        milestones = (int(0.5 * self.total_epochs), int(0.75 * self.total_epochs))
        return 0.1 ** sum(elapsed >= milestone for milestone in milestones)


class ClassificationModule(pl.LightningModule):
    """Image classifier: a model from the registry, cross-entropy, accuracy metrics, SGD + cosine.

    Args:
        model: Registry name (see :func:`lightning_prune.models.available_models`).
        num_classes: Classifier outputs.
        in_channels: Input image channels (1 for the digits quick start).
        model_kwargs: Extra keyword arguments for the model factory (e.g. ``{"width": 8}``).
        lr: Base learning rate.
        momentum: SGD momentum (ignored by Adam/AdamW).
        weight_decay: Weight decay of every parameter (decoupled for AdamW).
        optimizer: ``"sgd"`` (no Nesterov), ``"adam"`` or ``"adamw"``.
        scheduler: Per-epoch schedule: ``"cosine"`` (to zero over the training run), ``"step"``
            (x0.1 at 50 % and 75 % of it) or ``"none"``. See :class:`EpochLRSchedule`.
        max_epochs_hint: Length of the schedule in epochs; defaults to ``trainer.max_epochs``.
            Required when the trainer has no epoch limit.
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``.
        example_input_shape: ``(C, H, W)``; when given, ``example_input_array`` is a zero batch
            of 2 such inputs (used by Lightning's model summary and by graph tracing).

    Logged metrics (per epoch): ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    (progress bar), ``val/acc_top5``, ``test/loss``, ``test/acc``, ``test/acc_top5``. Top-5
    metrics exist only with more than 5 classes. Accuracies are micro-averaged (the fraction
    of correctly classified samples).
    """

    def __init__(
        self,
        model: str = "digits_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        scheduler: str = "cosine",
        max_epochs_hint: int | None = None,
        label_smoothing: float = 0.0,
        example_input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; accepted values: {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not supported; accepted values: {', '.join(SCHEDULERS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if max_epochs_hint is not None and max_epochs_hint < 1:
            raise ValueError(f"max_epochs_hint must be >= 1 or None, got {max_epochs_hint}")
        self.save_hyperparameters()

        self.model: nn.Module = create_model(model, num_classes=num_classes, in_channels=in_channels, **(model_kwargs or {}))
        if example_input_shape is not None:
            self.example_input_array = torch.zeros(2, *(int(d) for d in example_input_shape))

        def accuracy(top_k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")

        self.has_top5 = num_classes > 5
        self.train_acc = accuracy(1)
        self.val_acc = accuracy(1)
        self.test_acc = accuracy(1)
        self.val_acc_top5 = accuracy(5) if self.has_top5 else None
        self.test_acc_top5 = accuracy(5) if self.has_top5 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self._loss(logits, targets)
        self.train_acc(logits, targets)
        batch_size = images.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self._loss(logits, targets)
        batch_size = images.shape[0]
        top1: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        top1(logits, targets)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/acc", top1, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=batch_size)
        if self.has_top5:
            top5: MulticlassAccuracy = getattr(self, f"{stage}_acc_top5")
            top5(logits, targets)
            self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def _schedule_length_and_start(self) -> tuple[int, int]:
        try:
            trainer: pl.Trainer | None = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        total = self.hparams.max_epochs_hint
        if total is None and trainer is not None and trainer.max_epochs is not None and trainer.max_epochs > 0:
            total = trainer.max_epochs
        if total is None:
            raise ValueError(
                f"scheduler={self.hparams.scheduler!r} needs the training length: set max_epochs_hint "
                "or give the Trainer max_epochs"
            )
        start = trainer.current_epoch if trainer is not None else 0
        return int(total), int(start)

    def configure_optimizers(self) -> Any:
        """The optimizer and, unless ``scheduler="none"``, a per-epoch ``LambdaLR``.

        May be called again mid-training (e.g. by a pruning callback re-creating the optimizer
        for the pruned parameters); the schedule then resumes at the current epoch.
        """
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=False)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total, start = self._schedule_length_and_start()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, EpochLRSchedule(hp.scheduler, total, start))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}
