"""PruneCallback inside real Lightning fits on the scikit-learn digits (no download), under both Lightning import
names (``lightning_ns``: ``pytorch_lightning`` and ``lightning.pytorch``) with user-style modules of that namespace."""
from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_prune import PruningPlan, load_pruned
from lightning_prune.callbacks import PruneCallback
from lightning_prune.datamodules import DigitsDataModule

from .lightning_modules import IMAGE, fit_data, module_class

#: the namespace of the test being run (set by the autouse fixture below)
NS: dict = {}


@pytest.fixture(autouse=True)
def namespace(lightning_ns):
    NS["ns"] = lightning_ns
    yield lightning_ns
    NS.clear()


def make_module(**kwargs):
    return module_class(NS["ns"])(**kwargs)


def make_trainer(tmp_path, callbacks, max_epochs=4, logger=False, **kwargs):
    return NS["ns"].Trainer(
        accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), deterministic=True, **kwargs,
    )


class Data(dict):
    """``trainer.fit(module, **data)``: the datamodule under pytorch_lightning, its loaders under lightning.pytorch."""


def datamodule() -> Data:
    dm = DigitsDataModule(image_size=IMAGE, batch_size=64, seed=0)
    dm.setup("fit")
    data = Data(fit_data(NS["ns"], dm))
    data.dm = dm
    return data


def fit(trainer, module, data, **kwargs):
    return trainer.fit(module, **data, **kwargs)


def validate(trainer, module, data):
    return trainer.validate(module, dataloaders=data.dm.val_dataloader(), verbose=False)


class Recorder(pl.Callback):  # a pytorch_lightning Callback runs in either Trainer
    """Records parameter counts and the learning rate at every epoch end."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.params.append(sum(p.numel() for p in pl_module.parameters()))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fit_prunes_at_scheduled_epochs_and_logs(tmp_path):
    pl.seed_everything(0)
    recorder = Recorder()
    prune = PruneCallback(amount=0.5, epochs=[1, 2], criterion="l2")
    logger = NS["ns"].loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [prune, recorder], max_epochs=4, logger=logger)
    module = make_module()
    dm = datamodule()
    fit(trainer, module, dm)

    # Shapes shrink exactly at epochs 1 and 2 and nowhere else.
    p = recorder.params
    assert p[0] > p[1] > p[2] == p[3]
    assert prune.done_epochs == [1, 2]
    flops = [r["flops_after"] for r in prune.reports]
    assert flops[0] > flops[1]
    assert prune.reports[1]["channel_sparsity"] == pytest.approx(0.5, abs=0.05)

    accuracy = validate(trainer, module, dm)[0]["val/acc"]
    assert accuracy > 0.6  # chance is 0.1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("prune/flops", "prune/params", "prune/flops_reduction", "prune/channel_sparsity"):
        assert tag in tags, tags
    flops_curve = events.Scalars("prune/flops")
    assert len(flops_curve) >= 4  # the dense baseline, then one point per epoch since the first event
    # The curves start at the dense model, logged before any training step.
    assert flops_curve[0].step == 0 and flops_curve[0].value == prune.original_flops > flops_curve[-1].value
    assert events.Scalars("prune/channel_sparsity")[0].value == 0.0
    first_width = next(tag for tag in tags if tag.startswith("prune/width/"))
    assert events.Scalars(first_width)[0].value == prune.reports[0]["original_widths"][first_width[12:]]
    assert any(tag.startswith("prune/width/") for tag in tags)
    assert "prune/widths" in events.Tags()["images"]


def test_optimizer_momentum_survives_and_lr_schedule_is_unchanged(tmp_path):
    class MomentumSpy(pl.Callback):
        def __init__(self, when):
            self.when, self.snapshots = when, []

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                conv = pl_module.model.features[0].weight
                state = trainer.optimizers[0].state[conv]
                self.snapshots.append((conv.detach().clone(), state["momentum_buffer"].clone()))

    before, after = MomentumSpy("before"), MomentumSpy("after")
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1")
    recorder = Recorder()
    pl.seed_everything(0)
    make_trainer(tmp_path, [before, prune, after, recorder], max_epochs=3).fit(make_module(), **datamodule())

    kept = torch.tensor(prune.plan.groups["model.features.0"].kept)
    (old_weight, old_momentum), (new_weight, new_momentum) = before.snapshots[0], after.snapshots[0]
    assert new_momentum.shape[0] == len(kept) < old_momentum.shape[0]
    torch.testing.assert_close(new_momentum, old_momentum[kept])
    torch.testing.assert_close(new_weight, old_weight[kept])
    assert new_momentum.abs().sum() > 0  # not reset

    unpruned = Recorder()
    pl.seed_everything(0)
    make_trainer(tmp_path, [unpruned], max_epochs=3).fit(make_module(), **datamodule())
    assert recorder.lrs == pytest.approx(unpruned.lrs)


def test_bf16_clipping_accumulation_and_adamw_keep_working(tmp_path):
    """Precision plugin, gradient clipping and accumulation wrap the optimizer step; after surgery they must act
    on the pruned parameters, and AdamW's moments must match their shapes."""

    class LossSpy(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    spy, recorder = LossSpy(), Recorder()
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="taylor", scoring_batches=2)
    module = make_module(optimizer="adamw", lr=3e-3)
    trainer = make_trainer(tmp_path, [prune, spy, recorder], max_epochs=3, precision="bf16-mixed",
                           gradient_clip_val=0.5, accumulate_grad_batches=2)
    fit(trainer, module, datamodule())

    assert prune.done_epochs == [1] and recorder.params[0] > recorder.params[1]
    assert all(math.isfinite(loss) for loss in spy.losses)
    optimizer = trainer.optimizers[0]
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in module.parameters()}
    for p in module.parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape
    assert validate(trainer, module, datamodule())[0]["val/acc"] > 0.3  # chance is 0.1


class FixedWidthNet(torch.nn.Module):
    """``forward`` reshapes with a width stored in an attribute (as torchvision's ViT does with its embedding
    width), so the ``stem`` group cannot be removed although Torch-Pruning maps it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.width = 8
        self.body = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.head = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, _, h, w = x.shape
        x = x.reshape(n, self.width, h * w).reshape(n, self.width, h, w)
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_unprunable_groups_are_found_once_and_kept_across_events_and_checkpoints(tmp_path):
    from lightning_prune.models import available_models, register_model

    if "fixed_width_net" not in available_models():
        register_model("fixed_width_net")(FixedWidthNet)
    prune = PruneCallback(amount=0.5, epochs=[0, 1], criterion="l1", schedule="iterative")
    module = make_module(model="fixed_width_net")
    with pytest.warns(UserWarning, match="cannot be pruned") as caught:
        make_trainer(tmp_path, [prune], max_epochs=2).fit(module, **datamodule())
    assert sum("cannot be pruned" in str(w.message) for w in caught) == 1  # the second event skips the probe
    assert set(prune.excluded_groups) == {"model.stem"}
    assert prune.done_epochs == [0, 1]
    assert module.model.stem.out_channels == 8 and module.model.body.out_channels == 16
    # the excluded stem counts against the target in both events, not only in the one that excluded it
    assert [r["unprunable_widths"] for r in prune.reports] == [{"model.stem": [8, 8]}] * 2
    assert [r["target_met"] for r in prune.reports] == [False, False]
    assert prune.reports[-1]["channel_sparsity"] == pytest.approx(16 / 40)
    restored = PruneCallback(amount=0.5, epochs=[0, 1], criterion="l1")
    restored.load_state_dict(prune.state_dict())
    assert restored.excluded_groups == prune.excluded_groups


def ordered_loaders(dm: DigitsDataModule):
    dm.setup("fit")
    return (DataLoader(dm.train_dataset, batch_size=64, shuffle=False),
            DataLoader(dm.val_dataset, batch_size=128, shuffle=False))


def test_resume_mid_schedule_matches_uninterrupted_run(tmp_path):
    dm = datamodule()
    train, val = ordered_loaders(dm.dm)

    def callback():
        return PruneCallback(amount=0.5, epochs=[1, 2], criterion="l2", verbose=False)

    pl.seed_everything(0)
    reference = make_module()
    reference_callback = callback()
    make_trainer(tmp_path / "a", [reference_callback], max_epochs=4).fit(reference, train, val)

    class StopAfterEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # the first event happened at the start of epoch 1
                trainer.should_stop = True

    pl.seed_everything(0)
    first = make_module()
    trainer = make_trainer(tmp_path / "b", [callback(), StopAfterEpoch()], max_epochs=4)
    trainer.fit(first, train, val)
    assert trainer.current_epoch == 2
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = make_module()  # freshly constructed, unpruned
    resumed_callback = callback()
    make_trainer(tmp_path / "c", [resumed_callback], max_epochs=4).fit(resumed, train, val, ckpt_path=str(checkpoint))

    assert resumed_callback.done_epochs == [1, 2]
    assert resumed_callback.plan.checksum() == reference_callback.plan.checksum()
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    assert reference_state.keys() == resumed_state.keys()
    for key in reference_state:
        torch.testing.assert_close(resumed_state[key], reference_state[key], msg=key)


def test_load_pruned_and_weights_only_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    trainer = make_trainer(tmp_path, [PruneCallback(amount=0.4, epochs=[0], criterion="l2")], max_epochs=1)
    fit(trainer, module, datamodule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, weights_only=True)  # no pickled objects of ours
    assert PruningPlan.from_dict(raw["lightning_prune"]["plan"]).removed_channels() > 0

    loaded = load_pruned(module_class(NS["ns"]), str(path))
    x = torch.randn(4, 1, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in module.parameters())

    # LightningCLI stores how it instantiated the module next to the hyper-parameters; load_pruned ignores that.
    raw["hyper_parameters"].update(_instantiator="lightning.pytorch.cli.instantiate_module",
                                   _class_path="lightning_prune.classification.ClassificationModule")
    cli_path = tmp_path / "cli.ckpt"
    torch.save(raw, cli_path)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(module_class(NS["ns"]), str(cli_path))(x), module(x))


def test_fast_dev_run_prunes_once_at_epoch_zero(tmp_path):
    prune = PruneCallback(amount=0.5, epochs=[2, 3], criterion="l1")
    module = make_module()
    before = sum(p.numel() for p in module.parameters())
    trainer = make_trainer(tmp_path, [prune], fast_dev_run=2)
    with pytest.warns(UserWarning, match="fast_dev_run"):
        fit(trainer, module, datamodule())
    assert prune.done_epochs == [0]
    assert prune.reports[-1]["channel_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert sum(p.numel() for p in module.parameters()) < before
    assert prune.schedule[0][0] == 2  # the configured schedule itself is unchanged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=0.5, epochs=[7]), "max_epochs"),
        (dict(amount=0.5, flops_reduction=0.5), "exactly one"),
        (dict(), "exactly one"),
        (dict(amount=1.0), "amount"),
        (dict(amount=0.5, criterion="l3"), "criterion"),
        (dict(amount=0.5, allocation="everywhere"), "allocation"),
        (dict(amount=0.5, schedule="weekly"), "schedule"),
        (dict(amount=0.5, ignore=["model.nothing"]), "ignore"),
        (dict(amount=0.5, scoring_batches=0), "scoring_batches"),
        (dict(amount=0.5, allocation="sensitivity", sensitivity={"prune_multiplier": 2}),
         r"sensitivity: unknown option\(s\) \['prune_multiplier'\]; accepted keys: prune_multiple"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, kwargs, match):
    module = make_module()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        callback = PruneCallback(**kwargs)
        make_trainer(tmp_path, [callback], max_epochs=3).fit(module, **datamodule())
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no training step happened


def test_flops_target_is_reached(tmp_path):
    pl.seed_everything(0)
    prune = PruneCallback(flops_reduction=0.6, schedule="agp", start_epoch=0, steps=2, criterion="l1", verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(make_module(), **datamodule())
    assert prune.reports[0]["flops_reduction"] < prune.reports[1]["flops_reduction"]
    assert prune.reports[-1]["flops_reduction"] >= 0.6 - 1e-3
    assert prune.reports[-1]["target_met"]
