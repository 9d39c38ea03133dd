"""PruneCallback beside other Lightning callbacks, frozen layers and torch.compile, under both Lightning import
names. Each row of docs/compatibility.md is one of these tests. Small fits: digits 12x12, a few batches."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import load_pruned
from lightning_prune.callbacks import PruneCallback
from lightning_prune.callbacks.interop import averaged_copies

from .lightning_modules import IMAGE, digits, fit_data, module_class

FIRST = "model.features.0"


def trainer_for(ns, tmp_path, callbacks, max_epochs=3, **kwargs):
    options = dict(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), deterministic=True, limit_train_batches=4, limit_val_batches=2)
    options.update(kwargs)
    return ns.Trainer(**options)


def run(ns, tmp_path, callbacks, module=None, **kwargs):
    pl.seed_everything(0)
    module = module if module is not None else module_class(ns)()
    trainer = trainer_for(ns, tmp_path, callbacks, **kwargs)
    trainer.fit(module, **fit_data(ns, digits()))
    return trainer, module


class AverageSpy(pl.Callback):
    """Copies the averaged first-conv weight of a weight-averaging callback at the start of epoch ``epoch``."""

    def __init__(self, averaging, epoch=1):
        self.averaging, self.epoch, self.weight = averaging, epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            copies = [model for cb, model in averaged_copies(trainer) if cb is self.averaging]
            self.weight = copies[0].get_submodule(FIRST).weight.detach().clone()


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_weight_averaging_copy_gets_the_same_surgery(lightning_ns, tmp_path, kind):
    """The averaged copy loses the same channels and keeps the average of the kept ones; fit finishes, and the
    averaged (pruned) weights end up in the module."""
    if kind == "ema":
        averaging = lightning_ns.callbacks.EMAWeightAveraging(decay=0.9)
    else:
        averaging = lightning_ns.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    before, after = AverageSpy(averaging), AverageSpy(averaging)
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1", verbose=False)
    trainer, module = run(lightning_ns, tmp_path, [averaging, before, prune, after], max_epochs=3)

    kept = torch.tensor(prune.plan.groups[FIRST].kept)
    assert len(kept) < before.weight.shape[0]
    torch.testing.assert_close(after.weight, before.weight[kept], rtol=0, atol=0)
    (_, copy), = averaged_copies(trainer)
    assert [p.shape for p in copy.parameters()] == [p.shape for p in module.parameters()]
    assert [b.shape for b in copy.buffers()] == [b.shape for b in module.buffers()]
    # The module ends with the averaged weights (both callbacks copy them back at the end of training).
    torch.testing.assert_close(module.get_submodule(FIRST).weight, copy.get_submodule(FIRST).weight)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class DigitsWithBackbone:
    """BackboneFinetuning freezes ``pl_module.backbone``; a property, so the module is not registered twice."""

    @property
    def backbone(self):
        return self.model.features

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]  # the backbone joins when unfrozen
        return torch.optim.SGD(trainable, lr=0.05, momentum=0.9)


def test_backbone_finetuning_frozen_then_unfrozen_groups(lightning_ns, tmp_path):
    """Epoch 1: the backbone is frozen, so only the head's group is pruned (and the frozen groups are named);
    epoch 2 unfreezes it into a new param group; epoch 3 prunes the backbone too. The optimizer holds exactly the
    module's trainable parameters throughout."""
    cls = type("Module", (DigitsWithBackbone, module_class(lightning_ns)), {})
    finetuning = lightning_ns.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=2, verbose=False)
    prune = PruneCallback(amount=0.3, epochs=[1, 3], criterion="l1", schedule="iterative", verbose=False)
    with pytest.warns(UserWarning, match=r"model\.features\.0.*frozen"):
        trainer, module = run(lightning_ns, tmp_path, [finetuning, prune], module=cls(), max_epochs=4)
    first, second = prune.reports
    assert set(first["removed"]) == {"model.classifier.1"}  # the frozen backbone's groups were skipped
    assert second["widths_after"]["model.features.0"] < 16 and "model.features.0" in second["removed"]
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2  # the backbone's group, added at epoch 2
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters()}
    assert all(p.requires_grad for p in module.parameters())
    for p in module.parameters():
        if "momentum_buffer" in optimizer.state.get(p, {}):
            assert optimizer.state[p]["momentum_buffer"].shape == p.shape


class FreezeMiddleConv(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        pl_module.model.features[3].weight.requires_grad_(False)


@pytest.mark.parametrize("prune_frozen", [False, True])
def test_frozen_layers_keep_their_state(lightning_ns, tmp_path, prune_frozen):
    """A frozen conv in the middle of the network, optimizer over all parameters: by default its group is left
    at full width (said once, before training); with prune_frozen=True it is pruned and stays frozen. Either way
    its weights do not train and every parameter keeps its requires_grad."""
    module = module_class(lightning_ns)()
    frozen_before = module.model.features[3].weight.detach().clone()
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1", verbose=False, prune_frozen=prune_frozen)
    if prune_frozen:
        trainer, module = run(lightning_ns, tmp_path, [FreezeMiddleConv(), prune], module=module, max_epochs=2)
    else:
        with pytest.warns(UserWarning, match=r"\['model\.features\.3'\] are not pruned") as caught:
            trainer, module = run(lightning_ns, tmp_path, [FreezeMiddleConv(), prune], module=module, max_epochs=2)
        assert sum("frozen" in str(w.message) for w in caught) == 1
    weight = module.model.features[3].weight
    assert not weight.requires_grad
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == ["model.features.3.weight"]
    group = prune.plan.groups.get("model.features.3")
    if prune_frozen:
        kept = torch.tensor(group.kept)
        assert len(kept) == 16
        rows = frozen_before[kept]
    else:
        assert group is None or len(group.kept) == 32
        rows = frozen_before
    in_channels = torch.tensor(prune.plan.groups["model.features.0"].kept)
    torch.testing.assert_close(weight, rows[:, in_channels], rtol=0, atol=0)  # never trained
    assert prune.reports[0]["channel_sparsity"] > 0


def test_model_pruning_is_refused_in_setup(lightning_ns, tmp_path):
    module = module_class(lightning_ns)()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    other = lightning_ns.callbacks.ModelPruning("l1_unstructured", amount=0.5)
    with pytest.raises(ValueError, match="cannot run beside ModelPruning: it reparametrizes"):
        run(lightning_ns, tmp_path, [PruneCallback(amount=0.5, epochs=[1]), other], module=module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # no training step


class RaiseAt(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted after the event")


def test_stock_callbacks_see_the_pruned_model(lightning_ns, tmp_path):
    """ModelCheckpoint, EarlyStopping, LearningRateMonitor, Timer, ModelSummary, GradientAccumulationScheduler in
    one fit with two events; then OnExceptionCheckpoint on a fit that fails after an event. Every checkpoint
    loads into its pruned architecture."""
    cb = lightning_ns.callbacks
    checkpoint = cb.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    early = cb.EarlyStopping(monitor="val/loss", patience=10)
    lr_monitor = cb.LearningRateMonitor(logging_interval="epoch")
    timer = cb.Timer()
    accumulation = cb.GradientAccumulationScheduler({0: 1, 2: 2})
    prune = PruneCallback(amount=0.5, epochs=[1, 2], criterion="l2", schedule="iterative", verbose=False)
    logger = lightning_ns.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer, module = run(lightning_ns, tmp_path, [cb.ModelSummary(max_depth=2), checkpoint, early, lr_monitor,
                                                   timer, accumulation, prune],
                          max_epochs=3, logger=logger, enable_checkpointing=True)
    assert prune.done_epochs == [1, 2] and trainer.current_epoch == 3
    assert trainer.accumulate_grad_batches == 2
    assert early.wait_count <= 10 and math.isfinite(float(early.best_score))
    assert timer.time_elapsed("train") > 0
    assert "lr-SGD" in trainer.callback_metrics or "lr-SGD" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    cls = module_class(lightning_ns)
    for path in (checkpoint.last_model_path, checkpoint.best_model_path):  # written after an event: pruned
        saved = torch.load(path, weights_only=True)
        loaded = load_pruned(cls, path)  # strict: every tensor has the shape of its pruned architecture
        widths = prune.reports[min(saved["epoch"], 2) - 1]["widths_after"]
        assert loaded.get_submodule(FIRST).out_channels == widths[FIRST] < 16
        assert loaded(torch.randn(4, 1, IMAGE, IMAGE)).shape == (4, 10)

    on_exception = cb.OnExceptionCheckpoint(dirpath=str(tmp_path / "exc"))
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l2", verbose=False)
    with pytest.raises(RuntimeError, match="interrupted after the event"):
        run(lightning_ns, tmp_path / "b", [prune, on_exception, RaiseAt(1)], max_epochs=3, enable_checkpointing=True)
    saved = load_pruned(cls, str(tmp_path / "exc" / "on_exception.ckpt"))
    assert saved.get_submodule(FIRST).out_channels == len(prune.plan.groups[FIRST].kept) < 16


# -- torch.compile -------------------------------------------------------------------------------------------------
class CountingBackend:
    """A dynamo backend that runs the captured graph eagerly and records the parameter shapes it compiled for."""

    def __init__(self):
        self.compiled_shapes: list[set[tuple[int, ...]]] = []

    def __call__(self, graph_module, example_inputs):
        self.compiled_shapes.append({tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)})
        return graph_module.forward


@pytest.mark.parametrize("form", ["fit(torch.compile(module))", "self.model = torch.compile(net)"])
def test_compiled_module_prunes_recompiles_and_matches_eager(lightning_ns, tmp_path, form):
    torch._dynamo.reset()
    backend = CountingBackend()
    cls = module_class(lightning_ns)

    def fit(compiled):
        pl.seed_everything(0)
        if compiled and form.startswith("self.model"):
            module = cls(compile_backend=backend)
            target = module
        else:
            module = cls()
            target = torch.compile(module, backend=backend) if compiled else module
        prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1", verbose=False)
        trainer = trainer_for(lightning_ns, tmp_path, [prune], max_epochs=2, limit_val_batches=0)
        trainer.fit(target, **fit_data(lightning_ns, digits()))
        return module, prune

    eager, eager_prune = fit(False)
    compiled, compiled_prune = fit(True)
    def kept(prune):  # compiled in __init__, module names go through the OptimizedModule: "model._orig_mod.*"
        return {name.replace("._orig_mod", ""): g.kept for name, g in prune.plan.groups.items()}

    assert kept(compiled_prune) == kept(eager_prune) and compiled_prune.done_epochs == [1]
    pruned_first = tuple(compiled.get_submodule(FIRST.replace("model.", "model._orig_mod.")
                                                if form.startswith("self.model") else FIRST).weight.shape)
    assert pruned_first[0] == 8
    # dynamo compiled again for the pruned shapes, and that compiled code trained the pruned model
    assert any(pruned_first in shapes for shapes in backend.compiled_shapes)
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    compiled_state = {k.replace("._orig_mod", ""): v for k, v in compiled_state.items()}
    assert eager_state.keys() == compiled_state.keys()
    diff = max((eager_state[k].float() - compiled_state[k].float()).abs().max().item() for k in eager_state)
    assert diff < 1e-5, diff


def test_compiled_forward_function_is_refused_in_setup(lightning_ns, tmp_path):
    module = module_class(lightning_ns)()
    module.forward = torch.compile(module.forward, backend="eager")
    with pytest.raises(ValueError, match=r"compiled with torch.compile.*trainer.fit\(torch.compile\(module\)\)"):
        run(lightning_ns, tmp_path, [PruneCallback(amount=0.5, epochs=[1])], module=module)


def test_widths_figure_and_criteria_analysis_go_to_tensorboard_of_either_namespace(lightning_ns, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_prune.callbacks import CriteriaAnalysis

    logger = lightning_ns.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1", verbose=False)
    analysis = CriteriaAnalysis(epochs=[0], criteria=("l1", "l2"), figures=False, max_samples=500)
    run(lightning_ns, tmp_path, [analysis, prune], max_epochs=2, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "prune/widths" in events.Tags()["images"]
    assert any(tag.startswith("analysis/") or "criteria" in tag for tag in events.Tags()["scalars"]), \
        events.Tags()["scalars"]
    assert events.Scalars("prune/flops")[0].value == prune.original_flops  # the dense baseline at step 0


class StopAfter(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_with_weight_averaging_rebuilds_the_averaged_copy(lightning_ns, tmp_path):
    """Resuming after an event: the module and EMA's averaged copy both get the pruned structure before their
    weights are loaded, and the averaged weights are the checkpoint's."""
    ema = lightning_ns.callbacks.EMAWeightAveraging(decay=0.9)
    prune = PruneCallback(amount=0.5, epochs=[1], criterion="l1", verbose=False)
    trainer, _ = run(lightning_ns, tmp_path / "a", [ema, prune, StopAfter(1)], max_epochs=3)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]  # WeightAveraging saves the average here

    class CheckAverage(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            (_, copy), = averaged_copies(trainer)
            self.first = copy.get_submodule(FIRST).weight.detach().clone()

    check, ema, prune = CheckAverage(), lightning_ns.callbacks.EMAWeightAveraging(decay=0.9), PruneCallback(
        amount=0.5, epochs=[1], criterion="l1", verbose=False)
    pl.seed_everything(0)
    module = module_class(lightning_ns)()
    trainer_for(lightning_ns, tmp_path / "b", [ema, prune, check], max_epochs=3).fit(
        module, **fit_data(lightning_ns, digits()), ckpt_path=str(path))
    torch.testing.assert_close(check.first, saved[FIRST + ".weight"], rtol=0, atol=0)
    assert prune.done_epochs == [1] and module.get_submodule(FIRST).out_channels == 8
