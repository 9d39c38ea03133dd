"""A 2-process CPU (gloo) fit with pruning, run by tests/test_ddp.py in a subprocess.

Every rank writes what it ended with to ``--out``/rank<r>.pt so the test can compare ranks.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_prune.callbacks import PruneCallback
from lightning_prune.callbacks.distributed import ShardedBatches
from lightning_prune.classification import ClassificationModule
from lightning_prune.criteria import Random, get
from lightning_prune.criteria.scoring import score_groups
from lightning_prune.datamodules import DigitsDataModule
from lightning_prune.structure import DependencyGraph

IMAGE = 12


class UnionStatistics(pl.Callback):
    """Before the first event, rank 0 computes the criterion statistics a single process would get on the union
    of both ranks' scoring shards, on a copy of the model (outside any collective)."""

    def __init__(self, criterion_name: str, scoring_batches: int, out: Path):
        self.criterion_name, self.scoring_batches, self.out = criterion_name, scoring_batches, out
        self.done = False

    def on_train_epoch_start(self, trainer, pl_module):
        if self.done or trainer.current_epoch != 1 or trainer.global_rank != 0:
            return
        self.done = True
        model = copy.deepcopy(pl_module)
        graph = DependencyGraph(model, pl_module.example_input_array)
        discriminative = self.criterion_name in ("tt", "snr", "fdr", "sd")
        criterion = get(self.criterion_name, **({"num_classes": 10} if discriminative else {}))
        union = ShardedBatches(trainer.datamodule.scoring_dataloader(), 0, 1, self.scoring_batches * 2)
        score_groups(model, graph.groups, criterion, union)
        torch.save({k: v.cpu() for k, v in criterion.state().items()}, self.out / "union_state.pt")


class RecordFirstEventState(pl.Callback):
    def __init__(self, prune: PruneCallback, out: Path):
        self.prune, self.out, self.saved = prune, out, False

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.saved and self.prune.done_epochs and trainer.global_rank == 0:
            self.saved = True
            state = {k: v.cpu() for k, v in self.prune.criterion.state().items()}
            torch.save(state, self.out / "reduced_state.pt")


class SaveRankResult(pl.Callback):
    """Runs inside every worker (also under ddp_spawn, where code after fit() only runs in the launcher)."""

    def __init__(self, prune: PruneCallback, out: Path):
        self.prune, self.out = prune, out

    def on_fit_end(self, trainer, pl_module):
        result = {
            "state": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            "plan": self.prune.plan.checksum(),
            "done": list(self.prune.done_epochs),
            "world_size": trainer.world_size,
            "val_images": self._val_images(trainer),
            "reports": [{"sensitivity_steps": r.get("sensitivity_steps", []), "target_met": r.get("target_met"),
                         "latency_ratio": r.get("latency_ratio")} for r in self.prune.reports],
            "latency_table": self.prune.latency_table,
        }
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")

    @staticmethod
    def _val_images(trainer) -> int:
        # lightning.pytorch runs get their data as dataloaders, not as a datamodule
        source = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
        return sum(len(batch[1]) for batch in source) if source is not None else 0


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--criterion", default="sd")
    parser.add_argument("--inconsistent", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--namespace", default="pytorch_lightning", choices=["pytorch_lightning", "lightning.pytorch"],
                        help="Lightning import name; lightning.pytorch runs a user-style module of that namespace")
    parser.add_argument("--sensitivity-bn", action="store_true",
                        help="sensitivity allocation with BatchNorm re-estimation in every trial")
    parser.add_argument("--sensitivity-default", action="store_true",
                        help="sensitivity allocation to a FLOPs target with the default options")
    parser.add_argument("--latency", action="store_true", help="latency_reduction=0.3 instead of amount=0.5")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--val-batches", type=float, default=2,
                        help="limit_val_batches; 0 turns the validation loop off (the pruning still validates)")
    parser.add_argument("--sensitivity-options", default=None, help="JSON dict of sensitivity options")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)

    scoring_batches = 2
    if args.inconsistent:
        # A rank-local seed: each process would remove different channels.
        criterion = Random(seed=int(os.environ.get("LOCAL_RANK", "0")) + 1)
    else:
        criterion = args.criterion
    extra = {}
    if args.sensitivity_bn:
        extra = dict(allocation="sensitivity",
                     sensitivity={"recalibrate_batches": 2, "num_groups": 2, "prune_multiple": 2.0, "progress": False})
    target = dict(amount=0.5)
    if args.sensitivity_default:
        import json

        options = json.loads(args.sensitivity_options) if args.sensitivity_options else None
        target = dict(flops_reduction=0.3)
        extra = dict(allocation="sensitivity", sensitivity=options)
    if args.latency:
        target = dict(latency_reduction=0.3, latency_cache=str(out / "latency-cache"))
    prune = PruneCallback(epochs=[1, 2], criterion=criterion, scoring_batches=scoring_batches,
                          verbose=False, **target, **extra)
    callbacks = [prune, RecordFirstEventState(prune, out), SaveRankResult(prune, out)]
    if not args.inconsistent and not args.resume and args.namespace == "pytorch_lightning":
        callbacks.insert(0, UnionStatistics(args.criterion, scoring_batches, out))
    if args.stop_after is not None:
        callbacks.append(StopAfterEpoch(args.stop_after))
    dm = DigitsDataModule(image_size=IMAGE, batch_size=32, seed=0)
    if args.namespace == "pytorch_lightning":
        module = ClassificationModule(model=args.model, num_classes=10, in_channels=1, lr=0.05,
                                      example_input_shape=(1, IMAGE, IMAGE))
        data = {"datamodule": dm}
    else:  # a lightning.pytorch Trainer takes only lightning.pytorch modules (and datamodules)
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.lightning_modules import fit_data, module_class

        module = module_class(args.namespace)()
        dm.setup("fit")
        data = fit_data(args.namespace, dm)
    trainer = importlib.import_module(args.namespace).Trainer(
        accelerator="cpu", devices=2, strategy=args.strategy, max_epochs=4, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        sync_batchnorm=args.sync_batchnorm, default_root_dir=str(out), limit_train_batches=6, limit_val_batches=int(args.val_batches),
    )
    trainer.fit(module, **data, ckpt_path=args.resume)
    if args.stop_after is not None:
        trainer.save_checkpoint(out / "mid.ckpt")


if __name__ == "__main__":
    main()
