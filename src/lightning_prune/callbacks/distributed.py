"""Keeping pruning identical across distributed processes (DDP).

Every rank scores on the statistics of the whole scoring set (criterion state is all-reduced), decides the same
removals deterministically, checks that all ranks agree *before* any surgery, and re-wraps the model in a fresh
``DistributedDataParallel`` afterwards (the old reducer holds the old parameters).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ..allocation.evaluation import LOCAL, AccuracyEvaluator, Collective
from ..errors import InconsistentRanksError
from ..structure import PruningPlan
from .data_sources import validation_dataloader


def is_distributed(trainer: pl.Trainer) -> bool:
    return dist.is_available() and dist.is_initialized() and trainer.world_size > 1


def state_reducer(trainer: pl.Trainer) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """Sum criterion state tensors over all ranks (``None`` when not distributed)."""
    if not is_distributed(trainer):
        return None

    def reduce(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layout = [(key, tuple(state[key].shape), str(state[key].dtype)) for key in sorted(state)]
        layouts: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(layouts, layout)
        if any(other != layout for other in layouts):
            raise InconsistentRanksError(
                "Criterion statistics differ in layout across ranks (e.g. a class seen on one rank only with "
                "num_classes unset); set the criterion's num_classes so every rank keeps the same state."
            )
        reduced = {}
        for key in sorted(state):
            tensor = state[key].clone()
            device = trainer.strategy.root_device
            on_device = tensor.to(device) if dist.get_backend() == "nccl" else tensor
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            reduced[key] = on_device.to(tensor.device)
        return reduced

    return reduce


def _digest(removals: dict[str, list[int]]) -> str:
    canonical = json.dumps({k: sorted(int(i) for i in v) for k, v in sorted(removals.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def removal_verifier(trainer: pl.Trainer) -> Callable[[dict[str, list[int]]], None] | None:
    """Before each surgery: compare a digest of the removals across ranks; a mismatch aborts before anything
    is pruned, on every rank."""
    if not is_distributed(trainer):
        return None

    def verify(removals: dict[str, list[int]]) -> None:
        digests: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(digests, _digest(removals))
        if len(set(digests)) > 1:
            raise InconsistentRanksError(
                f"Ranks chose different channels to remove (digests {[d[:8] for d in digests]}); nothing was pruned. "
                "A criterion must be deterministic across processes: seed random criteria explicitly and make "
                "data-driven criteria use all-reduced statistics."
            )

    return verify


def verify_same_plan(trainer: pl.Trainer, plan: PruningPlan) -> None:
    if not is_distributed(trainer):
        return
    checksums: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(checksums, plan.checksum())
    if len(set(checksums)) > 1:
        raise InconsistentRanksError(f"Pruning plans differ across ranks: {[c[:8] for c in checksums]}.")


def rewrap(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wrap the pruned module in a new DistributedDataParallel: the old one's reducer and buckets refer to the
    parameters that surgery replaced."""
    strategy = trainer.strategy
    wrapped = getattr(strategy, "model", None)
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return
    strategy.model = strategy._setup_model(pl_module)
    register = getattr(strategy, "_register_ddp_hooks", None)
    if register is not None:
        register()


class TorchCollective(Collective):
    """:class:`~lightning_prune.allocation.evaluation.Collective` over the default ``torch.distributed`` process
    group: sensitivity trials and Blend's search are split over the ranks and every rank decides on the same
    gathered numbers. ``device`` is where NCCL collectives run (the rank's GPU); gloo runs on the CPU."""

    def __init__(self, rank: int | None = None, world_size: int | None = None, device: Any = None):
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.device = device

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> "TorchCollective":
        return cls(trainer.global_rank, trainer.world_size, trainer.strategy.root_device)

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device(self.device) if self.device is not None else torch.device("cuda")
        return torch.device("cpu")

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) for v in tensor.cpu().tolist()]

    def sync_buffers(self, model: torch.nn.Module) -> None:
        device = self._device()
        for buffer in model.buffers():
            data = buffer.data
            moved = data.to(device)
            dist.broadcast(moved, src=0)
            if moved.data_ptr() != data.data_ptr():
                data.copy_(moved.to(data.device))


def collective(trainer: pl.Trainer) -> Collective:
    """The ranks of ``trainer`` (a no-op single process when not distributed)."""
    return TorchCollective.from_trainer(trainer) if is_distributed(trainer) else LOCAL


def validation_accuracy(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_fn: Callable | None,
                        shard: str = "groups") -> AccuracyEvaluator:
    """Top-1 accuracy on the held-out validation data (never the test set), counted exactly. Under DDP with
    ``shard="data"`` each rank evaluates every ``world_size``-th batch and the correct counts are summed; with
    ``"groups"`` every rank holds the whole split and the trials are split instead. Either way every rank gets
    the same numbers. Runs at the trainer's precision (autocast on GPU)."""
    from ..pruning import _accuracy_evaluator

    loader = validation_dataloader(trainer)
    if loader is None:
        raise ValueError("allocation='sensitivity' needs a validation dataloader (held out from the training set).")
    precision = getattr(getattr(trainer.strategy, "precision_plugin", None), "precision", None)
    return _accuracy_evaluator(pl_module, loader, batch_fn, collective=collective(trainer),
                               shard_data=shard == "data", precision=precision)


class ShardedBatches:
    """The first ``batches_per_rank * world_size`` batches of ``loader``, dealt round-robin to the ranks.

    Every rank iterates the same (seeded) loader and keeps batches ``i % world_size == rank``, so the shards are
    disjoint and their union is a fixed scoring set; summing the ranks' statistics gives the statistics of that
    union, exactly what a single process would compute on it."""

    def __init__(self, loader: Any, rank: int, world_size: int, batches_per_rank: int):
        self.loader, self.rank, self.world_size, self.batches_per_rank = loader, rank, world_size, batches_per_rank

    def __iter__(self):
        taken = 0
        for index, batch in enumerate(self.loader):
            if index >= self.batches_per_rank * self.world_size:
                break
            if index % self.world_size == self.rank:
                taken += 1
                yield batch


def shard_scoring_data(trainer: pl.Trainer, loader: Any, batches_per_rank: int) -> Any:
    if not is_distributed(trainer):
        return loader
    return ShardedBatches(loader, trainer.global_rank, trainer.world_size, batches_per_rank)


def is_spawned_worker(trainer: pl.Trainer) -> bool:
    from .interop import is_lightning_instance

    launcher = getattr(trainer.strategy, "launcher", None)  # either Lightning namespace
    return (is_lightning_instance(launcher, "strategies.launchers.multiprocessing._MultiProcessingLauncher")
            and dist.is_available() and dist.is_initialized())


SPAWN_KEY_PREFIX = "lightning_prune_pruned_weights/"


def keep_pruned_weights_in_worker(pl_module: pl.LightningModule) -> None:
    """With ``ddp_spawn`` Lightning copies the final weights back into the main process's module, which still
    has the original (unpruned) shapes, and no hook of ours runs in the main process to rebuild it first. Tag the
    worker's final state dict so that Lightning's non-strict copy-back skips it instead of failing the fit; the
    pruned model is in the checkpoints (``load_pruned``)."""
    from pytorch_lightning.utilities import rank_zero_warn

    def tag(module, state_dict, prefix, local_metadata):
        for key in list(state_dict):
            state_dict[SPAWN_KEY_PREFIX + key] = state_dict.pop(key)

    pl_module._register_state_dict_hook(tag)
    rank_zero_warn(
        "strategy='ddp_spawn': the pruned weights are not copied back into the main process's module (it still "
        "has the unpruned shapes). Load the pruned model from a checkpoint with lightning_prune.load_pruned, or "
        "use strategy='ddp'."
    )
