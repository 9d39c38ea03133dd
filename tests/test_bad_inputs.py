"""Bad inputs, table-driven: every public entry point rejects them with the right error type and a message that
names the parameter (or the file), before anything is changed: the model's state dict and shapes stay exactly
as they were, and a fit runs zero batches."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp
from lightning_prune import InvalidPlanError, PlanMismatchError, PruningPlan, apply_plan, load_pruned
from lightning_prune.callbacks import PruneCallback
from lightning_prune.classification import ClassificationModule
from lightning_prune.cli import main as cli_main
from lightning_prune.datamodules import CIFAR10DataModule, DigitsDataModule
from lightning_prune.errors import CheckpointError
from lightning_prune.models import create_model

IMAGE = 12


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("digits_cnn", num_classes=10, in_channels=1, width=8)


def make_module() -> ClassificationModule:
    return ClassificationModule(model="digits_cnn", num_classes=10, in_channels=1, model_kwargs={"width": 8},
                                example_input_shape=(1, IMAGE, IMAGE))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and plans shared by the cases: a good checkpoint, corrupt ones, a plan of a pruned model."""
    root = tmp_path_factory.mktemp("bad_inputs")
    x = torch.randn(2, 1, IMAGE, IMAGE)
    pruned = make_model()
    plan = lp.prune(pruned, x, amount=0.5).plan
    module = make_module()
    good = root / "good.ckpt"  # what Trainer.save_checkpoint writes, minus the trainer state
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, good)
    raw = good.read_bytes()
    paths = {"good": good, "missing": root / "missing.ckpt", "empty": root / "empty.ckpt",
             "truncated": root / "truncated.ckpt", "text": root / "text.ckpt", "state_dict": root / "weights.pt",
             "list": root / "list.pt", "tampered": root / "tampered.ckpt"}
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(raw[: len(raw) // 2])
    paths["text"].write_text("this is not a checkpoint\n")
    torch.save(module.state_dict(), paths["state_dict"])
    torch.save([1, 2, 3], paths["list"])
    checkpoint = torch.load(good, weights_only=True)
    name = next(iter(plan["groups"]))
    tampered_plan = copy.deepcopy(plan)
    tampered_plan["groups"][name]["kept"] = [0, 1, 2, 99]
    checkpoint["lightning_prune"] = {"plan": tampered_plan, "example_shape": [[2, 1, IMAGE, IMAGE]]}
    torch.save(checkpoint, paths["tampered"])
    return {"paths": paths, "plan": plan, "group": name}


@dataclass
class Ctx:
    model: torch.nn.Module
    x: torch.Tensor
    files: dict
    capsys: Any
    tmp_path: Any

    @property
    def plan(self) -> dict:
        return copy.deepcopy(self.files["plan"])

    @property
    def group(self) -> str:
        return self.files["group"]

    def plan_with(self, **fields) -> dict:
        plan = self.plan
        plan["groups"][self.group].update(fields)
        return plan

    def path(self, key: str) -> str:
        return str(self.files["paths"][key])


def loader(n=8):
    return DataLoader(TensorDataset(torch.randn(n, 1, IMAGE, IMAGE), torch.randint(0, 10, (n,))), batch_size=4)


def fit_with(callback_kwargs: dict, max_epochs: int = 2, ckpt: str | None = None) -> Callable[[Ctx], Any]:
    """A fit of a fresh LightningModule whose model is ``ctx.model``; it must fail before the first batch."""

    def run(ctx: Ctx) -> None:
        module = make_module()
        module.model = ctx.model
        batches = []

        class Count(pl.Callback):
            def on_train_batch_start(self, *args):
                batches.append(1)

        trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(ctx.tmp_path), limit_val_batches=0,
                             callbacks=[PruneCallback(amount=0.5, verbose=False, **callback_kwargs), Count()])
        try:
            trainer.fit(module, loader(), ckpt_path=ckpt(ctx) if callable(ckpt) else ckpt)
        finally:
            assert not batches, "a batch ran before the error"

    return run


def callback(**kwargs):
    return lambda ctx: PruneCallback(**{"amount": 0.5, **kwargs})


def prune(**kwargs):
    return lambda ctx: lp.prune(ctx.model, ctx.x, **kwargs)


def cli(*argv):
    def run(ctx: Ctx) -> None:
        try:
            cli_main([a(ctx) if callable(a) else a for a in argv])
        except SystemExit as error:  # argparse / jsonargparse report on stderr
            raise SystemExit(f"{error.code}: {ctx.capsys.readouterr().err}") from error

    return run


# (id, call, error type, substrings the message must contain)
CASES = [
    # -- PruneCallback(...) --------------------------------------------------------------------------------------
    ("callback-epochs-float", callback(epochs=[0.7]), TypeError, ["epochs"]),
    ("callback-epochs-unsorted", callback(epochs=[2, 1]), ValueError, ["epochs"]),
    ("callback-epochs-str", callback(epochs="1"), TypeError, ["epochs"]),
    ("callback-amount-range", callback(amount=1.5), ValueError, ["amount"]),
    ("callback-amount-str", callback(amount="0.5"), TypeError, ["amount"]),
    ("callback-both-targets", callback(flops_reduction=0.3), ValueError, ["amount", "flops_reduction"]),
    ("callback-criterion-name", callback(criterion="l9"), ValueError, ["criterion", "'l1'"]),
    ("callback-criterion-kwargs-key", callback(criterion_kwargs={"bogus": 1}), ValueError,
     ["criterion_kwargs", "bogus"]),
    ("callback-criterion-kwargs-type", callback(criterion_kwargs=[1]), TypeError, ["criterion_kwargs"]),
    ("callback-allocation", callback(allocation="glob"), ValueError, ["allocation", "'global'"]),
    ("callback-schedule", callback(schedule="cubic"), ValueError, ["schedule", "'agp'"]),
    ("callback-steps", callback(schedule="agp", steps=0), ValueError, ["steps"]),
    ("callback-start-epoch-float", callback(start_epoch=1.5), TypeError, ["start_epoch"]),
    ("callback-round-to-float", callback(round_to=8.0), TypeError, ["round_to"]),
    ("callback-max-group-sparsity", callback(max_group_sparsity=1.0), ValueError, ["max_group_sparsity"]),
    ("callback-scoring-batches-str", callback(scoring_batches="8"), TypeError, ["scoring_batches"]),
    ("callback-batch-fn", callback(batch_fn=3), TypeError, ["batch_fn"]),
    ("callback-ignore-type", callback(ignore=3), TypeError, ["ignore"]),
    ("callback-graph-kwargs-key", callback(graph_kwargs={"trace": "eval"}), ValueError,
     ["graph_kwargs", "trace_mode"]),
    ("callback-graph-kwargs-value", callback(graph_kwargs={"build_timeout": "10"}), TypeError,
     ["graph_kwargs", "build_timeout"]),
    ("callback-sensitivity-type", callback(sensitivity="fast"), TypeError, ["sensitivity"]),
    ("callback-on-error", callback(on_error="ignore"), ValueError, ["on_error", "'skip'"]),
    ("callback-verbose", callback(verbose="yes"), TypeError, ["verbose"]),
    ("callback-example-input", callback(example_input=[1, 2]), TypeError, ["example_input"]),
    # -- PruneCallback inside Trainer.fit: fails in setup, zero batches ------------------------------------------
    ("fit-ignore-unknown", fit_with({"ignore": ["model.nope"]}), ValueError, ["ignore", "model.nope"]),
    ("fit-epoch-too-late", fit_with({"epochs": [5]}), ValueError, ["epochs", "max_epochs"]),
    ("fit-resume-text-file", fit_with({"epochs": [0]}, ckpt=lambda ctx: ctx.path("text")), CheckpointError,
     ["ckpt_path", "text.ckpt"]),
    ("fit-resume-truncated", fit_with({"epochs": [0]}, ckpt=lambda ctx: ctx.path("truncated")), CheckpointError,
     ["ckpt_path", "truncated.ckpt", "truncated"]),
    ("fit-resume-plain-state-dict", fit_with({"epochs": [0]}, ckpt=lambda ctx: ctx.path("state_dict")),
     CheckpointError, ["ckpt_path", "weights.pt", "state_dict"]),
    # -- prune(model, x, ...) ------------------------------------------------------------------------------------
    ("prune-amount-negative", prune(amount=-0.1), ValueError, ["amount"]),
    ("prune-amount-bool", prune(amount=True), TypeError, ["amount"]),
    ("prune-criterion-type", prune(criterion=3), ValueError, ["criterion"]),
    ("prune-round-to-zero", prune(round_to=0), ValueError, ["round_to"]),
    ("prune-dataloader-type", prune(criterion="taylor", dataloader="batches"), TypeError, ["dataloader"]),
    ("prune-dataloader-missing", prune(criterion="taylor"), ValueError, ["dataloader"]),
    ("prune-ignore-unknown", prune(ignore=["nope"]), ValueError, ["ignore", "nope"]),
    ("prune-recalibrate-float", prune(recalibrate_batches=1.0, dataloader=loader()), TypeError,
     ["recalibrate_batches"]),
    ("prune-model-type", lambda ctx: lp.prune("resnet", ctx.x), TypeError, ["model"]),
    ("prune-unknown-kwarg", prune(bogus_option=1), ValueError, ["bogus_option"]),
    ("prune-trace-mode", prune(trace_mode="fast"), ValueError, ["trace_mode"]),
    ("prune-plan-type", prune(plan="plan.json"), TypeError, ["plan"]),
    ("prune-plan-unknown-group", lambda ctx: lp.prune(ctx.model, ctx.x, plan={"groups": {"nope": {
        "original_size": 8, "kept": [0, 1]}}}), PlanMismatchError, ["plan", "'nope'", "groups"]),
    ("prune-plan-wrong-widths", lambda ctx: lp.prune(ctx.model, ctx.x, plan=ctx.plan), PlanMismatchError,
     ["plan", "kept"]),
    ("prune-plan-tampered", lambda ctx: lp.prune(ctx.model, ctx.x, plan=ctx.plan_with(kept=[0, 0, 1])),
     InvalidPlanError, ["plan", "kept", "duplicate"]),
    # -- apply_plan(fresh model, plan, x) ------------------------------------------------------------------------
    ("plan-kept-out-of-range", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[0, 1, 2, 99]), ctx.x),
     InvalidPlanError, ["kept", "out of range", "99"]),
    ("plan-kept-negative", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[-1, 0, 1]), ctx.x),
     InvalidPlanError, ["kept", "-1"]),
    ("plan-kept-duplicates", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[0, 1, 1, 2]), ctx.x),
     InvalidPlanError, ["kept", "duplicate"]),
    ("plan-kept-unsorted", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[2, 1, 0]), ctx.x),
     InvalidPlanError, ["kept", "sorted"]),
    ("plan-kept-floats", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[0.0, 1.5]), ctx.x),
     InvalidPlanError, ["kept", "integers"]),
    ("plan-kept-str", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept="0,1"), ctx.x),
     InvalidPlanError, ["kept"]),
    ("plan-kept-empty", lambda ctx: apply_plan(ctx.model, ctx.plan_with(kept=[]), ctx.x),
     InvalidPlanError, ["kept", "empty"]),
    ("plan-kept-missing", lambda ctx: apply_plan(ctx.model, {"groups": {"features.0": {"original_size": 8}}}, ctx.x),
     InvalidPlanError, ["features.0", "kept"]),
    ("plan-original-size-wrong", lambda ctx: apply_plan(ctx.model, ctx.plan_with(original_size=64), ctx.x),
     PlanMismatchError, ["original_size", "64"]),
    ("plan-original-size-bool", lambda ctx: apply_plan(ctx.model, ctx.plan_with(original_size=True), ctx.x),
     InvalidPlanError, ["original_size"]),
    ("plan-unknown-group", lambda ctx: apply_plan(ctx.model, {"groups": {"features.99": {
        "original_size": 8, "kept": [0]}}}, ctx.x), PlanMismatchError, ["features.99", "groups"]),
    ("plan-format-version", lambda ctx: apply_plan(ctx.model, {**ctx.plan, "format": 2}, ctx.x),
     InvalidPlanError, ["format"]),
    ("plan-unknown-field", lambda ctx: apply_plan(ctx.model, {**ctx.plan, "grops": {}}, ctx.x),
     InvalidPlanError, ["grops"]),
    ("plan-not-a-dict", lambda ctx: apply_plan(ctx.model, "plan.json", ctx.x), InvalidPlanError, ["plan", "str"]),
    ("plan-entry-not-a-dict", lambda ctx: apply_plan(ctx.model, {"groups": {"features.0": [0, 1]}}, ctx.x),
     InvalidPlanError, ["features.0"]),
    ("plan-model-type", lambda ctx: apply_plan(None, ctx.plan, ctx.x), TypeError, ["model"]),
    # -- load_pruned(module_class, path) -------------------------------------------------------------------------
    ("load-missing", lambda ctx: load_pruned(ClassificationModule, ctx.path("missing")), FileNotFoundError,
     ["missing.ckpt", "does not exist"]),
    ("load-empty", lambda ctx: load_pruned(ClassificationModule, ctx.path("empty")), CheckpointError,
     ["empty.ckpt", "empty"]),
    ("load-truncated", lambda ctx: load_pruned(ClassificationModule, ctx.path("truncated")), CheckpointError,
     ["truncated.ckpt", "truncated"]),
    ("load-text", lambda ctx: load_pruned(ClassificationModule, ctx.path("text")), CheckpointError,
     ["text.ckpt", "not a torch.save archive"]),
    ("load-plain-state-dict", lambda ctx: load_pruned(ClassificationModule, ctx.path("state_dict")),
     CheckpointError, ["weights.pt", "state_dict"]),
    ("load-not-a-dict", lambda ctx: load_pruned(ClassificationModule, ctx.path("list")), CheckpointError,
     ["list.pt", "list"]),
    ("load-tampered-plan", lambda ctx: load_pruned(ClassificationModule, ctx.path("tampered")), InvalidPlanError,
     ["tampered.ckpt", "kept", "99"]),
    ("load-path-type", lambda ctx: load_pruned(ClassificationModule, 3), CheckpointError, ["checkpoint_path"]),
    ("load-module-class", lambda ctx: load_pruned("ClassificationModule", ctx.path("good")), TypeError,
     ["module_class"]),
    # -- datamodules ---------------------------------------------------------------------------------------------
    ("digits-batch-size-str", lambda ctx: DigitsDataModule(batch_size="32"), TypeError, ["batch_size"]),
    ("digits-batch-size-zero", lambda ctx: DigitsDataModule(batch_size=0), ValueError, ["batch_size"]),
    ("digits-num-workers-float", lambda ctx: DigitsDataModule(num_workers=1.5), TypeError, ["num_workers"]),
    ("digits-val-fraction", lambda ctx: DigitsDataModule(val_fraction=1.0), ValueError, ["val_fraction"]),
    ("digits-image-size-str", lambda ctx: DigitsDataModule(image_size="12"), TypeError, ["image_size"]),
    ("digits-seed-str", lambda ctx: DigitsDataModule(seed="0"), TypeError, ["seed"]),
    ("cifar-batch-size-float", lambda ctx: CIFAR10DataModule(batch_size=3.0), TypeError, ["batch_size"]),
    ("cifar-data-dir-type", lambda ctx: CIFAR10DataModule(data_dir=5), TypeError, ["data_dir"]),
    # -- the command line ----------------------------------------------------------------------------------------
    ("cli-export-missing-checkpoint", cli("export", "--checkpoint", lambda ctx: ctx.path("missing")),
     FileNotFoundError, ["--checkpoint", "missing.ckpt"]),
    ("cli-export-text-checkpoint", cli("export", "--checkpoint", lambda ctx: ctx.path("text")), CheckpointError,
     ["text.ckpt"]),
    ("cli-export-format", cli("export", "--checkpoint", lambda ctx: ctx.path("good"), "--format", "tflite"),
     SystemExit, ["--format", "tflite"]),
    ("cli-analyze-batches", cli("analyze", "--checkpoint", lambda ctx: ctx.path("good"), "--batches", "many"),
     SystemExit, ["--batches", "many"]),
    ("cli-fit-batch-size", cli("fit", "--data.batch_size=abc", "--trainer.max_epochs=1"), SystemExit,
     ["batch_size", "abc"]),
]


def test_the_table_covers_at_least_40_bad_inputs():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("call, error_type, names", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_rejected_naming_the_parameter_and_changes_nothing(call, error_type, names, files, capsys,
                                                                        tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, IMAGE, IMAGE)
    with pytest.raises(error_type) as caught:
        call(Ctx(model, x, files, capsys, tmp_path))
    message = str(caught.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
