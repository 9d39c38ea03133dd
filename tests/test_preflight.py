"""Fail before training: every input a pruning event needs is checked when fit starts, before the first training
batch (a counting callback proves that none ran). Real fits of a tiny user-style module under both Lightning
namespaces, and of the package's ClassificationModule on the digits."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_prune.callbacks import PruneCallback

IMAGE = 8


def user_module(ns, **extra):
    """A LightningModule as a user writes it, in namespace ``ns`` (``pytorch_lightning`` or ``lightning.pytorch``)."""

    class Net(ns.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(8, 3))
            for key, value in extra.items():
                setattr(self, key, value)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = (batch["pixels"], batch["cls"]) if isinstance(batch, dict) else batch[:2]
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch[:2]
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Net()


def counter(ns):
    class CountBatches(ns.Callback):
        """Counts training batches that started (the tests assert: none)."""

        def __init__(self):
            self.batches = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches += 1

    return CountBatches()


def data(samples=16, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, 1, IMAGE, IMAGE, generator=generator),
                         torch.randint(0, classes, (samples,), generator=generator))


class DictBatches(Dataset):
    """Samples as dicts with keys the default batch_fn does not know."""

    def __init__(self):
        self.base = data()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, y = self.base[index]
        return {"pixels": x, "cls": y}


def fit_fails(ns, tmp_path, callback, match, module=None, train=None, val=None, **trainer_kwargs):
    """Fit with ``callback``; assert the error matches and that zero training batches ran."""
    count = counter(ns)
    trainer = ns.Trainer(accelerator="cpu", max_epochs=3, callbacks=[callback, count], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), **trainer_kwargs)
    with pytest.raises(ValueError, match=match) as raised:
        trainer.fit(module or user_module(ns), DataLoader(train or data(), batch_size=4), val)
    assert count.batches == 0
    return str(raised.value)


# -- example input ---------------------------------------------------------------------------------------------
def test_wrong_shape_example_input_fails_before_training(lightning_ns, tmp_path):
    callback = PruneCallback(amount=0.5, epochs=[2], example_input=torch.zeros(2, 3, IMAGE, IMAGE))
    message = fit_fails(lightning_ns, tmp_path, callback, r"example_input: the forward of Net fails")
    assert "[2, 3, 8, 8]" in message and "Accepted" in message


def test_wrong_shape_example_input_array_fails_before_training(tmp_path):
    import pytorch_lightning as pl

    module = user_module(pl, example_input_array=torch.zeros(2, 1, 5))
    fit_fails(pl, tmp_path, PruneCallback(amount=0.5, epochs=[1]), r"LightningModule.example_input_array",
              module=module)


# -- batch_fn on one real batch --------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_dict_batch_with_unknown_keys_fails_before_training(lightning_ns, tmp_path, criterion):
    # l2 needs a training batch for the example input; taylor also scores on batches (example input given)
    module = user_module(lightning_ns, example_input_array=torch.zeros(2, 1, IMAGE, IMAGE))
    if criterion == "l2":
        module.example_input_array = None
    callback = PruneCallback(amount=0.5, epochs=[1], criterion=criterion)
    message = fit_fails(lightning_ns, tmp_path, callback, r"batch_fn: cannot find the inputs", module=module,
                        train=DictBatches())
    assert "['cls', 'pixels']" in message and "accepted keys: input, inputs, x, image, images" in message
    assert ("scoring" if criterion == "taylor" else "train") in message


def test_custom_batch_fn_on_dict_batches_passes_the_checks(tmp_path):
    import pytorch_lightning as pl

    callback = PruneCallback(amount=0.5, epochs=[0], criterion="sd", verbose=False,
                             batch_fn=lambda batch: (batch["pixels"], batch["cls"]))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(user_module(pl), DataLoader(DictBatches(), batch_size=4))
    assert callback.done_epochs == [0]


# -- labels for class-discrimination criteria ------------------------------------------------------------------
def test_missing_labels_fail_before_training(lightning_ns, tmp_path):
    images = TensorDataset(data().tensors[0])  # batches are [x]: no labels
    callback = PruneCallback(amount=0.5, epochs=[1], criterion="sd")
    fit_fails(lightning_ns, tmp_path, callback, r"batch_fn: criterion 'sd' needs class labels.*accepted",
              train=images)


@pytest.mark.parametrize("labels, match", [
    (torch.arange(16) % 5, r"num_classes: label 3 .* out of range .* num_classes=3; accepted labels: 0 \.\. 2"),
    (torch.arange(16) % 3 - 1, r"class labels must be >= 0"),
    (torch.rand(16), r"needs integer class labels"),
])
def test_bad_labels_fail_before_training(tmp_path, labels, match):
    import pytorch_lightning as pl

    train = TensorDataset(data().tensors[0], labels)
    callback = PruneCallback(amount=0.5, epochs=[1], criterion="snr", criterion_kwargs={"num_classes": 3})
    fit_fails(pl, tmp_path, callback, match, train=train)


# -- graph_kwargs, criterion_kwargs, ignore --------------------------------------------------------------------
@pytest.mark.parametrize("graph_kwargs, match", [
    ({"trace_mod": "eval"}, r"graph_kwargs: unknown key\(s\) \['trace_mod'\]; accepted keys: trace_mode, "
                            r"protect_outputs, build_timeout"),
    ({"trace_mode": "sideways"}, r"graph_kwargs: trace_mode='sideways'; accepted values: 'train', 'eval'"),
])
def test_bad_graph_kwargs_fail_before_training(tmp_path, graph_kwargs, match):
    import pytorch_lightning as pl

    count = counter(pl)
    with pytest.raises(ValueError, match=match):
        callback = PruneCallback(amount=0.5, epochs=[1], graph_kwargs=graph_kwargs)
        pl.Trainer(max_epochs=2, callbacks=[callback, count], logger=False).fit(user_module(pl),
                                                                                 DataLoader(data()))
    assert count.batches == 0


def test_unknown_criterion_kwargs_fail_before_training(tmp_path):
    import pytorch_lightning as pl

    count = counter(pl)
    with pytest.raises(ValueError, match=r"criterion_kwargs: unknown key\(s\) \['classes'\] for criterion 'sd'; "
                                         r"accepted keys: ridge, num_classes, combine"):
        callback = PruneCallback(amount=0.5, epochs=[1], criterion="sd", criterion_kwargs={"classes": 3})
        pl.Trainer(max_epochs=2, callbacks=[callback, count], logger=False).fit(user_module(pl),
                                                                                 DataLoader(data()))
    assert count.batches == 0


@pytest.mark.parametrize("ignore, match", [
    ([""], r"ignore: '' is not a module name; accepted values are non-empty names"),
    (["net.9"], r"ignore: 'net.9' is not a module of Net.*Did you mean"),
])
def test_bad_ignore_entries_fail_before_training(lightning_ns, tmp_path, ignore, match):
    fit_fails(lightning_ns, tmp_path, PruneCallback(amount=0.5, epochs=[1], ignore=ignore), match)


# -- validation data for sensitivity and blend -----------------------------------------------------------------
EMPTY = TensorDataset(torch.zeros(0, 1, IMAGE, IMAGE), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("kwargs, who", [
    (dict(allocation="sensitivity"), r"allocation='sensitivity'"),
    (dict(criterion="blend", criterion_kwargs={"criteria": ["l1", "l2"], "progress": False}), r"criterion 'blend'"),
])
def test_empty_validation_split_fails_before_training(lightning_ns, tmp_path, kwargs, who):
    callback = PruneCallback(amount=0.5, epochs=[1], **kwargs)
    fit_fails(lightning_ns, tmp_path, callback, who + r" measures validation accuracy, but the validation "
              r"dataloader is empty", val=DataLoader(EMPTY, batch_size=4))


def test_missing_validation_dataloader_fails_before_training(tmp_path):
    import pytorch_lightning as pl

    callback = PruneCallback(amount=0.5, epochs=[1], allocation="sensitivity")
    fit_fails(pl, tmp_path, callback, r"allocation='sensitivity' measures validation accuracy, but the fit has no "
              r"validation dataloader; accepted")


def test_empty_validation_split_of_a_datamodule_fails_before_training(tmp_path):
    import pytorch_lightning as pl

    from lightning_prune.classification import ClassificationModule
    from lightning_prune.datamodules import DigitsDataModule

    dm = DigitsDataModule(image_size=IMAGE, batch_size=64, val_fraction=0.0, seed=0)
    module = ClassificationModule(model="digits_cnn", num_classes=10, in_channels=1,
                                  example_input_shape=(1, IMAGE, IMAGE))
    count = counter(pl)
    callback = PruneCallback(amount=0.5, epochs=[1], allocation="sensitivity")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback, count], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"validation dataloader is empty"):
        trainer.fit(module, dm)
    assert count.batches == 0


# -- the checks leave training as it was -----------------------------------------------------------------------
def test_checks_leave_rng_batchnorm_and_modes_untouched(tmp_path):
    import pytorch_lightning as pl

    seen = {}

    class Snapshot(pl.Callback):
        def __init__(self, key):
            self.key = key

        def on_fit_start(self, trainer, pl_module):
            seen[self.key] = (torch.get_rng_state(), {k: v.clone() for k, v in pl_module.state_dict().items()},
                              [m.training for m in pl_module.modules()])

    pl.seed_everything(0)
    callback = PruneCallback(amount=0.5, epochs=[1], criterion="sd", verbose=False)  # example from a train batch
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[Snapshot("before"), callback, Snapshot("after")],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), limit_train_batches=1)
    module = user_module(pl)
    module.net[1].momentum = 1.0  # any train-mode forward would overwrite the running statistics
    trainer.fit(module, DataLoader(data(), batch_size=4, shuffle=True))
    (rng_before, state_before, modes_before), (rng_after, state_after, modes_after) = seen["before"], seen["after"]
    assert torch.equal(rng_before, rng_after)  # the shuffling sampler's seed came from a forked generator
    assert modes_before == modes_after
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)


# -- DDP: one rank's failure stops every rank before training --------------------------------------------------
def test_a_check_failing_on_one_rank_stops_all_ranks_before_training(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_preflight.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    # Without agreement rank 0 trains on: it dies on a closed gloo connection with no word of the cause (measured),
    # or waits on rank 1's gradients (NCCL).
    try:
        result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "run")], capture_output=True,
                                text=True, timeout=180, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"ranks desynchronised (hang)\n{error.stdout}\n{error.stderr}")
    reports = {r: (tmp_path / "run" / f"rank{r}.txt") for r in (0, 1)}
    assert all(p.is_file() for p in reports.values()), result.stdout[-3000:] + result.stderr[-3000:]
    zero, one = (reports[r].read_text().splitlines() for r in (0, 1))
    assert zero[0] == one[0] == "0"  # no training batch on either rank
    assert "batch_fn: rank-local failure" in one[1]
    assert zero[1].startswith("rank 1: PreflightError: batch_fn: rank-local failure")
