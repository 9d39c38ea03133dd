"""The ``lightning-prune`` command line.

Subcommands:

- ``fit``, ``validate``, ``test``: Lightning's own (:class:`PruneCLI`, a ``LightningCLI``), configured by YAML
  (``--config configs/quickstart.yaml``). :class:`~lightning_prune.callbacks.PruneCallback` goes under
  ``trainer.callbacks``. The model defaults to :class:`~lightning_prune.classification.ClassificationModule`,
  the data to :class:`~lightning_prune.datamodules.DigitsDataModule` (any datamodule class via ``class_path``);
  ``model.num_classes``, ``model.example_input_shape`` and ``model.in_channels`` are linked from the datamodule.
  After ``fit`` the CLI saves ``<log_dir>/pruned.ckpt``, evaluates the test set (``--test_after_fit false`` to
  skip) and prints a summary: accuracy before the first pruning event and after training, FLOPs and parameters
  before and after, where the logs and the checkpoint are.
- ``analyze``: criteria analysis of a (pruned) checkpoint (:func:`lightning_prune.analysis.analyze`).
- ``export``: ONNX and/or TorchScript export of a pruned checkpoint, checked against PyTorch.

Examples::

    lightning-prune fit --config configs/quickstart.yaml
    lightning-prune analyze --checkpoint outputs/quickstart/version_0/pruned.ckpt --config configs/quickstart.yaml
    lightning-prune export --checkpoint outputs/quickstart/version_0/pruned.ckpt --format both --out exported/
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_only

from .callbacks.checkpoints import read_checkpoint
from .callbacks.prune import PruneCallback, load_pruned
from .classification import ClassificationModule
from .datamodules import DigitsDataModule

__all__ = ["PrePruneAccuracy", "PruneCLI", "evaluate_accuracy", "main"]

PRUNED_CHECKPOINT = "pruned.ckpt"
DEFAULT_ANALYSIS_CRITERIA = "l1,l2,fpgm"


# ---------------------------------------------------------------------------------------------------------------
# accuracy before the first pruning event


def _prune_callback(trainer: pl.Trainer) -> PruneCallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, PruneCallback)), None)


def _first_event_epoch(callback: PruneCallback) -> int | None:
    pending = [epoch for epoch, _ in callback.events if epoch not in callback.done_epochs]
    return min(pending) if pending else None


def _val_loader(trainer: pl.Trainer) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        return datamodule.val_dataloader()
    return trainer.val_dataloaders


@torch.no_grad()
def evaluate_accuracy(module: torch.nn.Module, loader: Any, max_batches: int | None = None) -> float | None:
    """Top-1 accuracy of ``module`` over ``loader`` (``(inputs, labels)`` batches); train/eval mode is restored.

    Returns None when the loader is empty or its batches carry no labels."""
    from .criteria.scoring import default_batch_fn
    from .structure.tracing import move_to_device

    if loader is None:
        return None
    loaders = loader if isinstance(loader, (list, tuple)) else [loader]
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    correct = total = 0
    try:
        for single in loaders:
            for index, batch in enumerate(single):
                if max_batches is not None and index >= max_batches:
                    break
                inputs, labels = default_batch_fn(batch)
                if labels is None:
                    return None
                logits = module(move_to_device(inputs, device))
                correct += int((logits.argmax(-1).cpu() == labels.cpu()).sum())
                total += int(labels.numel())
    finally:
        module.train(was_training)
    return correct / total if total else None


class PrePruneAccuracy(Callback):
    """Records the validation accuracy of the unpruned model just before the first pruning event.

    For a first event at epoch ``e > 0`` it is the ``monitor`` metric of the validation at the end of epoch
    ``e - 1``; when that validation did not run (``check_val_every_n_epoch``, ``limit_val_batches=0``) or the first
    event is at epoch 0, the validation split is evaluated directly (top-1 of the arg-max, rank zero only).
    The value survives checkpoints, so a resumed run still reports it.

    Attributes:
        accuracy: the accuracy (None until known, or without validation data).
        epoch: the epoch whose end it was measured at (-1: before training).
        measured: ``"logged"`` (the trainer's validation) or ``"evaluated"`` (evaluated by this callback).
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.accuracy: float | None = None
        self.epoch: int | None = None
        self.measured: str | None = None

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        accuracy = None
        if trainer.is_global_zero:
            limit = trainer.limit_val_batches
            max_batches = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
            if max_batches != 0:
                accuracy = evaluate_accuracy(pl_module, _val_loader(trainer), max_batches)
        accuracy = trainer.strategy.broadcast(accuracy, src=0)
        if accuracy is not None:
            self.accuracy, self.epoch, self.measured = float(accuracy), epoch, "evaluated"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = _prune_callback(trainer)
        if callback is None or callback.done_epochs:
            return
        if _first_event_epoch(callback) == trainer.current_epoch:
            self._measure(trainer, pl_module, trainer.current_epoch - 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = _prune_callback(trainer)
        if trainer.sanity_checking or callback is None or callback.done_epochs or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.accuracy, self.epoch, self.measured = float(value), trainer.current_epoch, "logged"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = _prune_callback(trainer)
        if callback is None or callback.done_epochs:
            return
        epoch = trainer.current_epoch
        if _first_event_epoch(callback) == epoch + 1 and self.epoch != epoch:
            self._measure(trainer, pl_module, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "epoch": self.epoch, "measured": self.measured}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracy = state_dict.get("accuracy")
        self.epoch = state_dict.get("epoch")
        self.measured = state_dict.get("measured")


# ---------------------------------------------------------------------------------------------------------------
# the Lightning CLI


def _in_channels(shape: Sequence[int]) -> int:
    return int(shape[0])


class PruneCLI(LightningCLI):
    """``LightningCLI`` with the classification module, the datamodules linked to it and a post-fit summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ClassificationModule)
        # Any LightningDataModule with ``num_classes`` and ``example_input_shape`` (class_path in the config);
        # DigitsDataModule when the config names none.
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", False)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Checkpoints keep plain hyper-parameters (no "_instantiator" entry), so that load_pruned() and
        # ClassificationModule.load_from_checkpoint() rebuild the module from them directly.
        kwargs.setdefault("load_from_checkpoint_support", False)
        trainer_defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        extra = trainer_defaults.get("callbacks") or []
        extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
        self.pre_prune_accuracy = PrePruneAccuracy()
        trainer_defaults["callbacks"] = [*extra, self.pre_prune_accuracy]
        kwargs["trainer_defaults"] = trainer_defaults
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault(
            "description",
            "lightning-prune: physical channel pruning while training with PyTorch Lightning. Subcommands: fit, "
            "validate, test (Lightning's) and analyze, export (see `lightning-prune analyze --help`).",
        )
        kwargs["parser_kwargs"] = parser_kwargs
        self.summary: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.example_input_shape", "model.example_input_shape", apply_on="instantiate")
        parser.link_arguments("data.example_input_shape", "model.in_channels", compute_fn=_in_channels,
                              apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit only: evaluate the test set after training and report it in the summary.")
        parser.add_argument("--num_threads", type=Optional[int], default=None,
                            help="torch.set_num_threads() before anything runs (null: PyTorch's default). Tiny "
                                 "networks on a CPU train fastest on 1 thread.")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        threads = config.get("num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"num_threads must be >= 1 or null, got {threads}")
            torch.set_num_threads(int(threads))

    def after_fit(self) -> None:
        trainer, module = self.trainer, self.model
        log_dir = trainer.log_dir or trainer.default_root_dir
        checkpoint_path = os.path.join(log_dir, PRUNED_CHECKPOINT)
        trainer.save_checkpoint(checkpoint_path, weights_only=False)
        val_acc = _metric(trainer, "val/acc")
        test_acc = None
        config = self.config.get(str(self.subcommand), self.config)
        run_test = config.get("test_after_fit", True)
        if run_test and self.datamodule is not None and _has_test_data(self.datamodule) and not trainer.interrupted:
            results = trainer.test(module, datamodule=self.datamodule, verbose=False)
            if results:
                test_acc = results[0].get("test/acc")
        callback = _prune_callback(trainer)
        self.summary = build_summary(callback, self.pre_prune_accuracy, val_acc, test_acc, trainer, checkpoint_path)
        print_summary(self.summary)


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _has_test_data(datamodule: Any) -> bool:
    method = getattr(type(datamodule), "test_dataloader", None)
    return method is not None and method is not getattr(pl.LightningDataModule, "test_dataloader", None)


def _tensorboard_root(trainer: pl.Trainer) -> str | None:
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return os.path.normpath(logger.root_dir)
    return None


def build_summary(callback: PruneCallback | None, before: PrePruneAccuracy, val_acc: float | None,
                  test_acc: float | None, trainer: pl.Trainer, checkpoint_path: str) -> dict[str, Any]:
    """The numbers the post-fit summary prints (also kept as ``PruneCLI.summary``)."""
    summary: dict[str, Any] = {
        "val_acc_before": before.accuracy,
        "before_epoch": before.epoch,
        "val_acc_after": val_acc,
        "test_acc_after": test_acc,
        "log_dir": trainer.log_dir or trainer.default_root_dir,
        "tensorboard_dir": _tensorboard_root(trainer),
        "checkpoint": checkpoint_path,
        "events": [],
    }
    if callback is not None:
        reports = callback.reports
        summary["events"] = [int(r.get("epoch", -1)) for r in reports]
        summary["flops_before"] = callback.original_flops
        summary["params_before"] = callback.original_params
        if reports:
            last = reports[-1]
            summary["flops_after"] = last.get("flops_after")
            summary["params_after"] = last.get("params_after")
            summary["channel_sparsity"] = last.get("channel_sparsity")
            if last.get("latency_ratio") is not None:  # latency_reduction: measured on this machine
                summary["latency_before_ms"] = last.get("dense_latency_ms")
                summary["latency_after_ms"] = last.get("latency_after_ms")
                summary["latency_ratio"] = last.get("latency_ratio")
    return summary


def _count(value: float | int | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _reduction(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"({100 * (1 - after / before):.1f}% removed, {before / after:.2f}x smaller)" if after else ""


@rank_zero_only
def print_summary(summary: dict[str, Any]) -> None:
    """Print the post-fit summary table (rank zero)."""
    width = 78
    before_label = "before pruning"
    if summary.get("before_epoch") is not None:
        epoch = summary["before_epoch"]
        before_label += " (initial)" if epoch < 0 else f" (epoch {epoch})"
    rows = [
        ("", before_label, "after training", ""),
        ("val accuracy", _percent(summary.get("val_acc_before")), _percent(summary.get("val_acc_after")), ""),
        ("test accuracy", "-", _percent(summary.get("test_acc_after")), ""),
        ("FLOPs", _count(summary.get("flops_before")), _count(summary.get("flops_after")),
         _reduction(summary.get("flops_before"), summary.get("flops_after"))),
        ("parameters", _count(summary.get("params_before")), _count(summary.get("params_after")),
         _reduction(summary.get("params_before"), summary.get("params_after"))),
    ]
    if summary.get("latency_ratio") is not None:
        rows.append(("latency (ms)", f"{summary['latency_before_ms']:.2f}", f"{summary['latency_after_ms']:.2f}",
                     f"({100 * (1 - summary['latency_ratio']):.1f}% removed, measured)"))
    if summary.get("channel_sparsity") is not None:
        rows.append(("channels removed", "0%", _percent(summary["channel_sparsity"]), ""))
    lines = ["", "=" * width, "lightning-prune summary".center(width), "=" * width]
    lines += [f"{a:<18}{b:>22}{c:>16}  {d}".rstrip() for a, b, c, d in rows]
    lines.append("-" * width)
    events = summary.get("events") or []
    if "flops_before" not in summary:
        lines.append("no PruneCallback configured (add one under trainer.callbacks)")
    elif not events:
        lines.append("no pruning event ran")
    else:
        lines.append(f"pruning events at epochs: {', '.join(map(str, events))}")
    lines.append(f"logs:              {summary['log_dir']}")
    if summary.get("tensorboard_dir"):
        lines.append(f"TensorBoard:       tensorboard --logdir {summary['tensorboard_dir']}")
    lines.append(f"pruned checkpoint: {summary['checkpoint']}")
    lines.append("=" * width)
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# analyze and export


def _load_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    if "fit" in config and isinstance(config["fit"], dict) and "model" not in config:
        config = config["fit"]
    return config


def _import(dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"{dotted!r} is not a dotted path (package.module.Class)")
    return getattr(importlib.import_module(module_name), name)


def _module_class(config: dict[str, Any]) -> type[pl.LightningModule]:
    model = config.get("model")
    if isinstance(model, dict) and "class_path" in model:
        return _import(model["class_path"])
    if isinstance(model, str):
        return _import(model)
    return ClassificationModule


def _datamodule_from_config(config: dict[str, Any]) -> pl.LightningDataModule | None:
    data = config.get("data")
    if data is None:
        return None
    from jsonargparse import ArgumentParser

    if isinstance(data, dict) and "class_path" not in data:
        data = {"class_path": "lightning_prune.datamodules.DigitsDataModule", "init_args": data}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", fail_untyped=False)
    namespace = parser.parse_object({"data": data})
    return parser.instantiate_classes(namespace).data


def load_checkpoint_module(checkpoint: str, config: str | None = None) -> pl.LightningModule:
    """The pruned LightningModule of ``checkpoint`` (class from ``config``'s ``model.class_path``, else
    :class:`~lightning_prune.classification.ClassificationModule`), on CPU, in eval mode."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: the file does not exist")
    module_class = _module_class(_load_yaml(config))
    return load_pruned(module_class, checkpoint, map_location="cpu")


def example_input(module: pl.LightningModule, checkpoint: str, batch_size: int = 1) -> torch.Tensor:
    """A zero input of the checkpoint's recorded example shape (or the module's ``example_input_array``)."""
    saved = read_checkpoint(checkpoint).get("lightning_prune") or {}
    shapes = saved.get("example_shape")
    if shapes:
        return torch.zeros(batch_size, *shapes[0][1:])
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return torch.zeros(batch_size, *example.shape[1:])
    raise ValueError("cannot tell the model's input shape: the checkpoint has no lightning_prune.example_shape and "
                     "the module no example_input_array")


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-prune analyze",
        description="Criteria analysis (similarity, applicability, CWDA) of a pruned checkpoint: JSON, PNG "
                    "figures and a text summary.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by `lightning-prune fit`")
    parser.add_argument("--config", help="the fit config (model class; its data feeds data-driven criteria)")
    parser.add_argument("--criteria", default=DEFAULT_ANALYSIS_CRITERIA,
                        help=f"comma-separated criterion names (default {DEFAULT_ANALYSIS_CRITERIA})")
    parser.add_argument("--out", help="output directory (default: <checkpoint dir>/analysis)")
    parser.add_argument("--batches", type=int, default=8,
                        help="scoring batches for data-driven criteria (needs --config with data; default 8)")
    parser.add_argument("--target", type=float, default=0.5,
                        help="channel sparsity at which pruned sets are compared (default 0.5)")
    parser.add_argument("--no-figures", action="store_true", help="write the JSON report only")
    return parser


def run_analyze(argv: Sequence[str]) -> int:
    args = _analyze_parser().parse_args(list(argv))
    from . import analysis

    criteria = tuple(name.strip() for name in args.criteria.split(",") if name.strip())
    if not criteria:
        raise SystemExit("lightning-prune analyze: --criteria is empty")
    module = load_checkpoint_module(args.checkpoint, args.config)
    example = example_input(module, args.checkpoint, batch_size=2)
    from . import criteria as criteria_module

    needs_data = any(criteria_module.get(name).requires_data for name in criteria)
    dataloader = None
    datamodule = _datamodule_from_config(_load_yaml(args.config)) if args.config and needs_data else None
    if needs_data and datamodule is None:
        raise SystemExit("lightning-prune analyze: data-driven criteria need --config with a data section "
                         f"(requested: {', '.join(criteria)})")
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        dataloader = (datamodule.scoring_dataloader() if hasattr(datamodule, "scoring_dataloader")
                      else datamodule.train_dataloader())
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    report = analysis.analyze(
        _network(module), example, criteria=criteria, dataloader=dataloader, target=args.target,
        scoring_batches=args.batches if dataloader is not None else None,
        meta={"checkpoint": str(args.checkpoint), "config": args.config},
    )
    json_path = report.to_json(out / "report.json")
    figures = [] if args.no_figures else report.save_figures(out)
    print(report.summary())
    print(f"\nreport: {json_path}")
    if figures:
        print(f"figures ({len(figures)}): {out}")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-prune export",
        description="Export a pruned checkpoint's network (the module's .model when present) to ONNX and/or "
                    "TorchScript, and check that the exported model computes what PyTorch computes.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by `lightning-prune fit`")
    parser.add_argument("--config", help="the fit config (only its model.class_path is used)")
    parser.add_argument("--format", choices=("onnx", "torchscript", "both"), default="both")
    parser.add_argument("--out", help="output directory (default: <checkpoint dir>/export)")
    parser.add_argument("--name", default="model", help="file stem (default: model)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted absolute difference to PyTorch, relative to the largest output "
                             "magnitude when that exceeds 1 (default 1e-4)")
    return parser


def _network(module: pl.LightningModule) -> torch.nn.Module:
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = 17) -> str:
    """``torch.onnx.export`` with a dynamic batch axis. The TorchScript-based exporter (``dynamo=False``) needs no
    extra package; the dynamo exporter (needs ``onnxscript``) is the fallback. Returns which one worked."""
    common = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (example,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **common)
            return "torchscript-based (dynamo=False)"
        except Exception as error:  # the legacy exporter may be gone in a later torch
            errors.append(f"dynamo=False: {error}")
        try:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(net, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **common)
            return "dynamo"
        except Exception as error:
            errors.append(f"dynamo=True: {error}")
    raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(errors))


def _compare(output: torch.Tensor, reference: torch.Tensor, atol: float) -> tuple[str, bool]:
    """``(verdict, ok)``: the largest absolute difference must be at most ``atol``, scaled by the largest
    reference magnitude when that exceeds 1 (float32 rounding grows with the magnitude of the logits)."""
    if not torch.isfinite(reference).all():
        return "not checked: the PyTorch outputs are not finite (NaN/inf weights?)", False
    difference = float((output.to(reference.dtype) - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = atol * max(1.0, scale)
    ok = math.isfinite(difference) and difference <= tolerance
    scaled = f" = {atol:g} x output scale {scale:.3g}" if scale > 1.0 else ""
    return f"max abs difference {difference:.3g} (tolerance {tolerance:.3g}{scaled}): {'OK' if ok else 'FAILED'}", ok


def run_export(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(list(argv))
    module = load_checkpoint_module(args.checkpoint, args.config)
    net = _network(module).eval()
    example = example_input(module, args.checkpoint, batch_size=1)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    # Check on a batch size other than the traced one: the batch axis must stay dynamic.
    check = torch.randn(3, *example.shape[1:], generator=generator)
    with torch.no_grad():
        reference = net(check)
    params = sum(p.numel() for p in net.parameters())
    print(f"exporting {type(net).__name__} ({params:,} parameters) from {args.checkpoint}; "
          f"input shape (batch, {', '.join(map(str, example.shape[1:]))})")
    failed = False
    if args.format in ("onnx", "both"):
        path = out / f"{args.name}.onnx"
        exporter = export_onnx(net, example, path, args.opset)
        line = f"ONNX:        {path}  (exporter: {exporter})"
        try:
            import onnx

            onnx.checker.check_model(onnx.load(str(path)))
        except ImportError:
            pass
        try:
            import onnxruntime
        except ImportError:
            print(line + "\n             onnxruntime is not installed: output not checked")
        else:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            output = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
            verdict, ok = _compare(torch.from_numpy(output), reference, args.atol)
            failed |= not ok
            print(f"{line}\n             onnxruntime vs PyTorch: {verdict}")
    if args.format in ("torchscript", "both"):
        path = out / f"{args.name}.torchscript.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, example)
            traced.save(str(path))
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            verdict, ok = _compare(loaded(check), reference, args.atol)
        failed |= not ok
        print(f"TorchScript: {path}\n             torch.jit.load vs PyTorch: {verdict}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# entry point

EXTRA_COMMANDS = {"analyze": run_analyze, "export": run_export}


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-prune`` console script (``args`` default to ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    PruneCLI(args=None if args is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
