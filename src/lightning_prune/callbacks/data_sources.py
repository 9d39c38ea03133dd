"""Where a pruning event's data comes from: the same sources for the fit-start checks (:mod:`.preflight`) and
for the events themselves (scoring, example input, sensitivity trials), so the checks test what the events read.

Lightning sets ``trainer.train_dataloader`` / ``val_dataloaders`` only once the fit loop starts; before that (in
``on_fit_start``) a loader is requested from the same data source Lightning will use.
"""
from __future__ import annotations

from typing import Any


def train_dataloader(trainer: Any) -> Any:
    """The fit's train dataloader, before Lightning has set it up (``trainer.train_dataloader`` is ``None`` until
    the fit loop starts): the same source Lightning will request it from."""
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader
    return _request(getattr(trainer.fit_loop, "_data_source", None))


def scoring_dataloader(callback: Any, trainer: Any) -> Any:
    """The callback's ``scoring_dataloader`` (a loader, or a callable returning one), else the datamodule's
    ``scoring_dataloader()``, else the train dataloader."""
    if callback.scoring_dataloader is not None:
        loader = callback.scoring_dataloader
        return loader() if callable(loader) else loader
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "scoring_dataloader"):
        return datamodule.scoring_dataloader()
    return train_dataloader(trainer)


def validation_dataloader(trainer: Any) -> Any:
    """The held-out data sensitivity trials and blend's search evaluate on: the datamodule's ``val_dataloader()``,
    else the fit's validation dataloaders (``None`` when there are none, or validation is off with
    ``limit_val_batches=0``)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        try:
            return datamodule.val_dataloader()
        except Exception:  # noqa: BLE001 - Lightning's default hook raises when val_dataloader is not implemented
            return None
    if trainer.limit_val_batches == 0:
        return None
    if trainer.val_dataloaders is not None:
        return trainer.val_dataloaders
    return _request(getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None))


def _request(source: Any) -> Any:
    if source is None or getattr(source, "instance", None) is None or not source.is_defined():
        return None
    return source.dataloader()
