"""Fault injection: a prune event that fails or is interrupted at any stage leaves the exact previous model,
optimizer state and plan (or, after it completed, a consistent one); nothing half-pruned reaches a checkpoint.

Faults are injected by wrapping the project's own stage functions (and, for "midway through the parameter
replacements", Torch-Pruning's parameter-replacement function, counted so that it fails on its third call) with
functions that raise RuntimeError or KeyboardInterrupt. Training, surgery and checkpointing are real.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torch_pruning.pruner import function as tp_function

import lightning_prune.callbacks.prune as callback_module
import lightning_prune.allocation.strategies as strategies_module
import lightning_prune.structure.optimizer as optimizer_module
from lightning_prune import PruningPlan, apply_plan, load_pruned
from lightning_prune.callbacks import PruneCallback
from lightning_prune.classification import ClassificationModule
from lightning_prune.datamodules import DigitsDataModule
from lightning_prune.structure import DependencyGraph, ParameterLineage

IMAGE = 12
EVENT_EPOCH = 1  # epoch 0 trains first, so the optimizer has momentum to slice


@pytest.fixture(autouse=True)
def keep_sigint_handler():
    """Lightning ignores SIGINT after it handled a KeyboardInterrupt; give pytest its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def make_module() -> ClassificationModule:
    return ClassificationModule(model="digits_cnn", num_classes=10, in_channels=1, model_kwargs={"width": 8},
                                lr=0.05, scheduler="cosine", example_input_shape=(1, IMAGE, IMAGE))


def loaders():
    dm = DigitsDataModule(image_size=IMAGE, batch_size=32, seed=0)
    dm.setup("fit")
    return DataLoader(dm.train_dataset, batch_size=32, shuffle=False)


def make_trainer(root, callbacks, max_epochs=2, checkpointing=False, **kwargs) -> pl.Trainer:
    kwargs.setdefault("limit_train_batches", 2)
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                      enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), limit_val_batches=0, deterministic=True, **kwargs)


def capture(trainer: pl.Trainer, module: pl.LightningModule, prune: PruneCallback) -> dict:
    params = list(module.parameters())
    position = {id(p): i for i, p in enumerate(params)}
    optimizer = trainer.optimizers[0]
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "params": params,
        "opt_params": [list(g["params"]) for g in optimizer.param_groups],
        "opt_state": {position.get(id(p), -1): {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                 for k, v in s.items()} for p, s in optimizer.state.items()},
        "plan": prune.plan.to_dict(),
        "done": list(prune.done_epochs),
    }


def assert_exactly_as_before(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].shape == value.shape, key
        assert torch.equal(after["state"][key], value), key
    assert len(before["params"]) == len(after["params"])
    assert all(a is b for a, b in zip(before["params"], after["params"]))  # the very same Parameter objects
    assert [[id(p) for p in g] for g in before["opt_params"]] == [[id(p) for p in g] for g in after["opt_params"]]
    assert before["opt_state"].keys() == after["opt_state"].keys()
    assert -1 not in after["opt_state"]  # every optimizer state entry belongs to a parameter of the model
    for index, state in before["opt_state"].items():
        for key, value in state.items():
            other = after["opt_state"][index][key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (index, key)
    assert before["plan"] == after["plan"]
    assert before["done"] == after["done"]


def assert_runs(module: torch.nn.Module) -> None:
    x = torch.randn(4, 1, IMAGE, IMAGE)
    with torch.no_grad():
        module.train()
        assert torch.isfinite(module(x)).all()
        module.eval()
        assert module(x).shape == (4, 10)


class Snapshot(pl.Callback):
    """Captures the state at the start of the event epoch; placed before (``when="before"``) or after the
    PruneCallback in the callback list."""

    def __init__(self, prune: PruneCallback):
        self.prune, self.taken = prune, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == EVENT_EPOCH:
            self.taken = capture(trainer, pl_module, self.prune)


def _raiser(exception: type[BaseException], original=None):
    """Raises on its first call (a transient fault); later calls run ``original`` (when given)."""
    calls = {"n": 0}

    def fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1 or original is None:
            raise exception("injected fault")
        return original(*args, **kwargs)

    return fail


def _fail_midway_through_replacements(monkeypatch, exception):
    original = tp_function.BasePruningFunc._prune_parameter_and_grad
    calls = {"n": 0}

    def counted(self, weight, keep_idxs, pruning_dim):
        calls["n"] += 1
        if calls["n"] == 3:  # after two parameters were already replaced
            raise exception("injected fault midway through surgery")
        return original(self, weight, keep_idxs, pruning_dim)

    monkeypatch.setattr(tp_function.BasePruningFunc, "_prune_parameter_and_grad", counted)


def _fail_partway_through_optimizer_commit(monkeypatch, exception):
    def partial_commit(optimizer, new_params, moved_keys, new_state):
        for group, params in zip(optimizer.param_groups, new_params):
            group["params"] = params  # parameters swapped, state not yet
        optimizer.state.pop(moved_keys[0], None)
        raise exception("injected fault inside the optimizer transplant")

    monkeypatch.setattr(optimizer_module, "_commit", partial_commit)


def _fail_after_transplant(monkeypatch, exception):
    real = callback_module.transplant_optimizer

    def transplant_then_fail(optimizer, replacements):
        real(optimizer, replacements)
        raise exception("injected fault after the optimizer transplant")

    monkeypatch.setattr(callback_module, "transplant_optimizer", transplant_then_fail)


STAGES = {
    "scoring": lambda mp, prune, exc: mp.setattr(prune.criterion, "score", _raiser(exc, prune.criterion.score)),
    "allocation": lambda mp, prune, exc: mp.setattr(strategies_module, "allocate",
                                                    _raiser(exc, strategies_module.allocate)),
    "surgery:plan-update": lambda mp, prune, exc: mp.setattr(PruningPlan, "add_event",
                                                             _raiser(exc, PruningPlan.add_event)),
    "surgery:midway": lambda mp, prune, exc: _fail_midway_through_replacements(mp, exc),
    "surgery:forward-check": lambda mp, prune, exc: mp.setattr(DependencyGraph, "_check_forward",
                                                               _raiser(exc, DependencyGraph._check_forward)),
    "surgery:lineage": lambda mp, prune, exc: mp.setattr(ParameterLineage, "replacements",
                                                         _raiser(exc, ParameterLineage.replacements)),
    "optimizer:partial-commit": lambda mp, prune, exc: _fail_partway_through_optimizer_commit(mp, exc),
    "optimizer:after-transplant": lambda mp, prune, exc: _fail_after_transplant(mp, exc),
    "logging": lambda mp, prune, exc: mp.setattr(callback_module, "log_prune_event",
                                                 _raiser(exc, callback_module.log_prune_event)),
}


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_fault_at_each_stage_leaves_model_optimizer_and_plan_exactly_as_before(stage, exception, tmp_path,
                                                                                 monkeypatch):
    pl.seed_everything(0)
    module = make_module()
    prune = PruneCallback(amount=0.5, epochs=[EVENT_EPOCH], criterion="l2", verbose=False)
    before, after = Snapshot(prune), Snapshot(prune)
    trainer = make_trainer(tmp_path, [before, prune, after])
    real_start = prune.on_train_epoch_start

    def start_with_fault(trainer_, pl_module):  # install the fault only for the event, not for epoch 0
        if trainer_.current_epoch == EVENT_EPOCH:
            STAGES[stage](monkeypatch, prune, exception)
        real_start(trainer_, pl_module)

    monkeypatch.setattr(prune, "on_train_epoch_start", start_with_fault)
    if exception is KeyboardInterrupt:
        with pytest.raises(SystemExit):  # Lightning turns a KeyboardInterrupt into a graceful exit
            trainer.fit(module, loaders())
        assert_exactly_as_before(before.taken, capture(trainer, module, prune))
        assert not prune.failed_events  # an interruption is not a skipped event: it stops training
    else:
        with pytest.warns(UserWarning, match="Pruning at epoch 1 failed"):
            trainer.fit(module, loaders())
        assert_exactly_as_before(before.taken, after.taken)
        assert [e["epoch"] for e in prune.failed_events] == [EVENT_EPOCH]
        assert "injected fault" in prune.failed_events[0]["error"]
        assert trainer.current_epoch == 2  # training went on, on the untouched model
    assert_runs(module)
    assert len(module._load_state_dict_pre_hooks) == 0  # on_exception / teardown removed the callback's hooks
    assert "load_checkpoint" not in vars(trainer.strategy)


def test_on_error_raise_re_raises_after_restoring_and_on_exception_checkpoint_is_whole(tmp_path, monkeypatch):
    pl.seed_everything(0)
    module = make_module()
    prune = PruneCallback(amount=0.5, epochs=[EVENT_EPOCH], criterion="l2", verbose=False, on_error="raise")
    before = Snapshot(prune)
    saver = pl.callbacks.OnExceptionCheckpoint(str(tmp_path / "exc"))
    trainer = make_trainer(tmp_path, [before, prune, saver], checkpointing=True)
    real_start = prune.on_train_epoch_start

    def start_with_fault(trainer_, pl_module):
        if trainer_.current_epoch == EVENT_EPOCH:
            _fail_midway_through_replacements(monkeypatch, RuntimeError)
        real_start(trainer_, pl_module)

    monkeypatch.setattr(prune, "on_train_epoch_start", start_with_fault)
    with pytest.raises(RuntimeError, match="midway through surgery"):
        trainer.fit(module, loaders())
    assert_exactly_as_before(before.taken, capture(trainer, module, prune))
    # OnExceptionCheckpoint ran in on_exception: it saved the whole, unpruned model, which loads back.
    path = tmp_path / "exc" / "on_exception.ckpt"
    loaded = load_pruned(ClassificationModule, str(path))
    for key, value in before.taken["state"].items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
def test_fault_in_checkpoint_save_after_an_event_leaves_a_consistent_model(exception, tmp_path, monkeypatch):
    pl.seed_everything(0)
    module = make_module()
    prune = PruneCallback(amount=0.5, epochs=[EVENT_EPOCH], criterion="l2", verbose=False)
    saver = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1,
                                         save_top_k=-1)
    trainer = make_trainer(tmp_path, [prune, saver], checkpointing=True)
    real_save = prune.on_save_checkpoint

    def save_with_fault(trainer_, pl_module, checkpoint):
        if prune.done_epochs:  # the first save after the event
            raise exception("injected fault while saving a checkpoint")
        real_save(trainer_, pl_module, checkpoint)

    monkeypatch.setattr(prune, "on_save_checkpoint", save_with_fault)
    with pytest.raises(SystemExit if exception is KeyboardInterrupt else RuntimeError):
        trainer.fit(module, loaders())
    # Consistent after: the event completed, and model, optimizer and plan agree with each other.
    assert prune.done_epochs == [EVENT_EPOCH]
    fresh = make_module()
    apply_plan(fresh, prune.plan, torch.zeros(2, 1, IMAGE, IMAGE))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    params = {id(p): p for p in module.parameters()}
    optimizer = trainer.optimizers[0]
    assert all(id(p) in params for g in optimizer.param_groups for p in g["params"])
    for p, state in optimizer.state.items():
        assert id(p) in params and state["momentum_buffer"].shape == p.shape
    assert_runs(module)
    # No checkpoint of a half-written or half-pruned state: every file on disk loads into a working model.
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert files and all("epoch=1" not in f.name for f in files)
    for path in files:
        assert_runs(load_pruned(ClassificationModule, str(path)))


def test_failed_resume_from_a_wrong_checkpoint_then_the_right_one_works_on_the_same_module(tmp_path):
    pl.seed_everything(0)
    source = make_module()
    trainer = make_trainer(tmp_path / "a", [PruneCallback(amount=0.5, epochs=[0], criterion="l2", verbose=False)],
                           max_epochs=1)
    trainer.fit(source, loaders())
    right = tmp_path / "right.ckpt"
    trainer.save_checkpoint(right)
    checkpoint = torch.load(right, weights_only=True)
    del checkpoint["state_dict"]["model.classifier.3.bias"]  # same plan, weights that do not fit
    wrong = tmp_path / "wrong.ckpt"
    torch.save(checkpoint, wrong)

    module = make_module()  # one module object, resumed twice
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    prune = PruneCallback(amount=0.5, epochs=[0], criterion="l2", verbose=False)
    with pytest.raises(RuntimeError, match="classifier.3.bias"):
        make_trainer(tmp_path / "b", [prune], max_epochs=2).fit(module, loaders(), ckpt_path=str(wrong))
    assert len(module._load_state_dict_pre_hooks) == 0
    assert {k: v.shape for k, v in module.state_dict().items()} == shapes  # put back as before the resume
    assert prune.plan.is_empty()

    make_trainer(tmp_path / "c", [prune], max_epochs=2).fit(module, loaders(), ckpt_path=str(right))
    assert prune.done_epochs == [0]
    assert {k: v.shape for k, v in module.state_dict().items()} == \
        {k: v.shape for k, v in source.state_dict().items()}


def test_non_finite_scores_skip_the_event_with_a_warning(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    prune = PruneCallback(amount=0.5, epochs=[0], criterion="l1", verbose=False)
    with torch.no_grad():
        module.model.features[0].weight[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in module.state_dict().items()}

    class Check(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    check = Check()
    with pytest.warns(UserWarning, match="non-finite scores"):
        make_trainer(tmp_path, [prune, check], max_epochs=1, limit_train_batches=1).fit(module, loaders())
    assert prune.failed_events[0]["reason"] == "non-finite scores" and prune.plan.is_empty()
    assert {k: v.shape for k, v in check.state.items()} == {k: v.shape for k, v in before.items()}


def test_non_finite_loss_before_an_event_skips_it(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l2", verbose=False)
    original_step = module.training_step

    def nan_step(batch, batch_idx):
        loss = original_step(batch, batch_idx)
        return loss * float("nan") if module.current_epoch == 0 else loss

    module.training_step = nan_step
    with pytest.warns(UserWarning, match="non-finite loss"):
        make_trainer(tmp_path, [prune], max_epochs=2).fit(module, loaders())
    assert [e["reason"] for e in prune.failed_events] == ["non-finite loss"]
    assert prune.plan.is_empty() and prune.done_epochs == []


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import pytorch_lightning as pl
    from test_faults import make_module, make_trainer, loaders, kill_resume_callbacks

    class KillMidEpoch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no teardown: like a lost machine

    pl.seed_everything(0)
    trainer = make_trainer({root!r}, kill_resume_callbacks({root!r}) + [KillMidEpoch()], max_epochs=4,
                           checkpointing=True)
    trainer.fit(make_module(), loaders())
""")


def kill_resume_callbacks(root) -> list:
    return [PruneCallback(amount=0.5, epochs=[1, 2], criterion="l2", verbose=False),
            pl.callbacks.ModelCheckpoint(dirpath=os.path.join(str(root), "ckpt"), save_last=True)]


def test_kill_9_mid_epoch_then_resume_from_last_ckpt_is_bit_identical(tmp_path):
    """SIGKILL in the middle of epoch 2 (just after the second event); resuming from last.ckpt (end of epoch 1)
    on a fresh module ends with the plan and the exact weights of an uninterrupted run (unshuffled data)."""
    killed_root = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), root=str(killed_root))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    last = killed_root / "ckpt" / "last.ckpt"
    assert last.is_file()

    pl.seed_everything(0)
    reference = make_module()
    reference_callbacks = kill_resume_callbacks(tmp_path / "reference")
    make_trainer(tmp_path / "reference", reference_callbacks, max_epochs=4, checkpointing=True).fit(
        reference, loaders())

    resumed = make_module()  # freshly constructed, unpruned
    resumed_callbacks = kill_resume_callbacks(tmp_path / "resumed")
    make_trainer(tmp_path / "resumed", resumed_callbacks, max_epochs=4, checkpointing=True).fit(
        resumed, loaders(), ckpt_path=str(last))

    assert resumed_callbacks[0].done_epochs == [1, 2]
    assert resumed_callbacks[0].plan.checksum() == reference_callbacks[0].plan.checksum()
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    assert reference_state.keys() == resumed_state.keys()
    for key in reference_state:
        assert torch.equal(resumed_state[key], reference_state[key]), key
