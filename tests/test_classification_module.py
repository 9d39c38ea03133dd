"""ClassificationModule: a real short training run on the digits plus configuration errors."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune.classification import ClassificationModule, EpochLRSchedule
from lightning_prune.datamodules import DigitsDataModule
from lightning_prune.models import DigitsCNN



def test_two_epoch_fit_on_digits_learns_and_logs_metrics():
    pl.seed_everything(0, workers=True)
    dm = DigitsDataModule(batch_size=64)
    module = ClassificationModule(
        "digits_cnn", num_classes=dm.num_classes, in_channels=1, lr=0.05, example_input_shape=dm.example_input_shape
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5"} <= set(metrics)
    assert metrics["val/acc"] > 0.5
    assert metrics["val/acc_top5"] >= metrics["val/acc"]
    # The cosine schedule over max_epochs=2 ends at zero.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    (results,) = trainer.test(module, datamodule=dm, verbose=False)
    assert set(results) == {"test/loss", "test/acc", "test/acc_top5"}
    assert results["test/acc"] > 0.5


def test_model_construction_and_hparams():
    module = ClassificationModule(
        "digits_cnn", num_classes=10, in_channels=1, model_kwargs={"width": 4}, example_input_shape=[1, 12, 12]
    )
    assert isinstance(module.model, DigitsCNN)
    assert module.model.features[0].out_channels == 4
    assert module.example_input_array.shape == (2, 1, 12, 12)
    assert module(module.example_input_array).shape == (2, 10)
    assert module.hparams.model == "digits_cnn" and module.hparams.model_kwargs == {"width": 4}
    assert ClassificationModule("digits_cnn", in_channels=1).example_input_array is None


def test_top5_only_with_more_than_five_classes():
    assert ClassificationModule("digits_cnn", num_classes=5, in_channels=1).val_acc_top5 is None
    assert ClassificationModule("digits_cnn", num_classes=6, in_channels=1).val_acc_top5 is not None


@pytest.mark.parametrize(
    ("kwargs", "parameter", "accepted"),
    [
        ({"optimizer": "rmsprop"}, "optimizer", "sgd, adam, adamw"),
        ({"scheduler": "linear"}, "scheduler", "cosine, step, none"),
    ],
)
def test_unknown_optimizer_or_scheduler_fails_in_init(kwargs, parameter, accepted):
    with pytest.raises(ValueError) as info:
        ClassificationModule("digits_cnn", in_channels=1, **kwargs)
    assert f"{parameter}=" in str(info.value) and accepted in str(info.value)


def test_other_invalid_arguments():
    with pytest.raises(ValueError, match="model='no_such_net'"):
        ClassificationModule("no_such_net")
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationModule("digits_cnn", in_channels=1, label_smoothing=1.0)
    with pytest.raises(ValueError, match="max_epochs_hint"):
        ClassificationModule("digits_cnn", in_channels=1, max_epochs_hint=0)


@pytest.mark.parametrize(
    ("optimizer", "expected_type"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_optimizers(optimizer, expected_type):
    module = ClassificationModule("digits_cnn", in_channels=1, optimizer=optimizer, lr=0.01, weight_decay=1e-4, scheduler="none")
    built = module.configure_optimizers()
    assert type(built) is expected_type
    group = built.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 1e-4
    if optimizer == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"] is False


def test_schedule_needs_a_length_without_trainer():
    module = ClassificationModule("digits_cnn", in_channels=1)
    with pytest.raises(ValueError, match="max_epochs_hint"):
        module.configure_optimizers()
    hinted = ClassificationModule("digits_cnn", in_channels=1, max_epochs_hint=8, lr=0.1)
    config = hinted.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch"
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    expected = [0.05 * (1 + math.cos(math.pi * e / 8)) for e in range(8)]
    assert lrs == pytest.approx(expected)


def test_epoch_schedules_and_mid_training_restart():
    cosine = EpochLRSchedule("cosine", total_epochs=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert cosine(12) == pytest.approx(0.0)
    step = EpochLRSchedule("step", total_epochs=8)
    assert [step(e) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    # Rebuilt at epoch 5, the schedule continues rather than restarting.
    assert EpochLRSchedule("cosine", 10, start_epoch=5)(0) == pytest.approx(cosine(5))

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, EpochLRSchedule("cosine", 10, start_epoch=5))
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    restored = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, EpochLRSchedule("cosine", 10))
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0].start_epoch == 5
    with pytest.raises(ValueError, match="kind"):
        EpochLRSchedule("linear", 10)


class _RebuildOptimizerAtEpoch(pl.Callback):
    """What a pruning callback does after replacing layers: re-create optimizer and scheduler."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.lr_by_epoch: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.strategy.setup_optimizers(trainer)
        self.lr_by_epoch[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def test_schedule_survives_optimizer_rebuild_mid_training():
    rebuild = _RebuildOptimizerAtEpoch(epoch=2)
    module = ClassificationModule("digits_cnn", in_channels=1, model_kwargs={"width": 2}, lr=1.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rebuild],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    expected = {e: 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)}
    assert rebuild.lr_by_epoch == pytest.approx(expected)
