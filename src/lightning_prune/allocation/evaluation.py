"""Measuring trial accuracies: a counted, shardable, early-exiting validation pass, and the collective that keeps
DDP ranks deciding on the same numbers.

Sensitivity analysis (paper 2) and Blend's weight search spend almost all their time here: every round masks
each eligible group in turn and runs the whole held-out split. :class:`AccuracyEvaluator` makes one such pass
cheap and exact:

- the split is read once and kept (a ``DataLoader`` would restart its workers and reshuffle at every pass);
- correct predictions are counted as integers, so sums over batches or ranks are exact and order-independent;
- :meth:`AccuracyEvaluator.correct` can stop as soon as the trial can no longer reach a given count
  (``at_least``): "all remaining images correct" is an upper bound, so an early exit never changes a ranking;
- every image forwarded is counted (``images``), the machine-independent cost the benchmarks report;
- evaluation runs under ``torch.inference_mode`` and, on GPU, under autocast at the model's training precision.

:class:`Collective` is what the allocation layer needs from torch.distributed (the callback builds one from the
trainer; a single process uses :data:`LOCAL`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..structure.replay import PrefixReplay, RecordedPass
from ..structure.tracing import call_model, move_to_device


class Collective:
    """What a strategy needs to shard work over processes and keep their decisions identical.

    The single-process default does nothing. Subclasses (``callbacks.distributed.TorchCollective``) gather over
    the DDP ranks."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (picklable objects)."""
        return [value]

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of integer vectors over the ranks (exact)."""
        return [int(v) for v in values]

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank zero's buffers (BatchNorm running statistics), so every rank measures the same
        network. DDP keeps buffers per rank; callers restore their own afterwards."""

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items``: every ``world_size``-th item from position ``rank`` (round-robin, so
        an ordered list gives every rank a share of its front)."""
        return list(items[self.rank::self.world_size])


LOCAL = Collective()


class RecordedPasses:
    """The unchanged model's recorded passes, by batch, kept across calls of
    :meth:`AccuracyEvaluator.correct_trials` on the same, unchanged model: a lazy round's chunks then run the
    unchanged model once per batch instead of once per chunk. Passes are kept from the first batch on while their
    recorded outputs fit the replay budget (``replay_mb``) in all; the batches after run again in every call."""

    def __init__(self) -> None:
        self.passes: dict[int, tuple[int, RecordedPass]] = {}
        self.stored_bytes = 0
        self.full = False

    def keep(self, index: int, correct: int, replay: PrefixReplay) -> None:
        if self.full:
            return
        recorded = replay.snapshot()
        if self.stored_bytes + recorded.stored_bytes > replay.budget_bytes:
            self.full = True
            return
        self.passes[index] = (correct, recorded)
        self.stored_bytes += recorded.stored_bytes


def _split(batch: Any, batch_fn: Callable | None) -> tuple[Any, torch.Tensor]:
    from ..criteria.scoring import default_batch_fn

    inputs, labels = (batch_fn or default_batch_fn)(batch)
    if labels is None:
        raise ValueError("validation batches need labels: accuracy cannot be measured on (inputs,) batches; "
                         "pass batch_fn=lambda batch: (inputs, labels).")
    return inputs, labels


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate validation inputs of type {type(first).__name__} (set eval_batch_size=None)")


def _chunk(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_chunk(x, start, stop) for x in inputs)
    return {k: _chunk(v, start, stop) for k, v in inputs.items()}


def _first_tensor(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return _first_tensor(outputs[0])


def _count_correct(outputs: torch.Tensor, labels: torch.Tensor) -> int:
    return int((outputs.argmax(1).cpu() == labels).sum())


def _cannot_rank(name: str, counts: Mapping[str, int], seen: int, total: int, keep: int) -> bool:
    """True when trial ``name`` cannot end among the ``keep`` best: even with every unseen image correct it stays
    below the ``keep``-th best count the other trials already have (their final counts can only grow)."""
    others = sorted((c for n, c in counts.items() if n != name), reverse=True)
    return len(others) >= keep and counts[name] + (total - seen) < others[keep - 1]


def _progress(items: list, show: bool, unit: str = "batch") -> Any:
    """``items`` behind a tqdm bar when ``show`` (the sensitivity trials' bar: over batches or over trials)."""
    if not show or len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="sensitivity trials", unit=unit, leave=False)


AUTOCAST_DTYPES = {"16-mixed": torch.float16, "16": torch.float16, "16-true": torch.float16,
                   "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16}


class AccuracyEvaluator:
    """Top-1 accuracy of ``model`` on held-out batches, counted and exact; callable like the plain
    ``evaluate() -> float`` the allocators accept.

    Args:
        model: the network (evaluated in eval mode; modes are restored afterwards).
        dataloader: the held-out validation batches (never the test set); read once, on first use, and kept on
            the CPU.
        batch_fn: ``batch -> (inputs, labels)``.
        collective: with ``shard_data=True``, each rank keeps every ``world_size``-th batch and the correct
            counts are summed over the ranks (exactly the single-process count).
        shard_data: shard the split over the collective's ranks (see above).
        eval_batch_size: re-batch the split into batches of this many images (larger batches: fewer, faster
            forwards; ``None`` keeps the loader's batches). Early exit checks its bound between batches.
        precision: the trainer's precision (e.g. ``"bf16-mixed"``); on CUDA the forwards run under autocast at
            that dtype. On the CPU they run in float32, as trained.
    """

    def __init__(self, model: nn.Module, dataloader: Iterable, batch_fn: Callable | None = None, *,
                 collective: Collective = LOCAL, shard_data: bool = False, eval_batch_size: int | None = None,
                 precision: Any = None):
        self.model, self.dataloader, self.batch_fn = model, dataloader, batch_fn
        self.collective = collective
        self.shard_data = bool(shard_data) and collective.is_distributed
        self.eval_batch_size = eval_batch_size
        self.precision = None if precision is None else str(precision)
        self.images = 0  #: image-forwards so far (this rank); a pass with a replayed prefix counts each image once
        #: the same in full-forward equivalents: a replayed pass counts the share of the convolution/linear MACs it
        #: computed (machine-independent; equals ``images`` without prefix replay)
        self.forward_equivalents = 0.0
        self.evaluations = 0  #: passes started (full or exited early)
        self._batches: list[tuple[Any, torch.Tensor]] | None = None
        self._total: int | None = None
        self._warned_truncated = False

    # -- the split ---------------------------------------------------------------------------------------------
    def batches(self) -> list[tuple[Any, torch.Tensor]]:
        """This rank's batches of the split, ``(inputs, labels)``, read once."""
        if self._batches is None:
            batches = [_split(batch, self.batch_fn) for batch in self.dataloader]
            if self.eval_batch_size and batches:
                inputs, labels = _cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
                size = int(self.eval_batch_size)
                batches = [(_chunk(inputs, i, i + size), labels[i:i + size]) for i in range(0, len(labels), size)]
            if self.shard_data:
                batches = batches[self.collective.rank::self.collective.world_size]
            self._batches = [(inputs, labels.reshape(-1).cpu()) for inputs, labels in batches]
        return self._batches

    @property
    def total(self) -> int:
        """Images in the whole split (over all ranks when sharded)."""
        if self._total is None:
            local = sum(int(labels.numel()) for _, labels in self.batches())
            self._total = self.collective.sum_ints([local])[0] if self.shard_data else local
        return self._total

    # -- one pass ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluation_mode(self, inference: bool = True) -> Iterator[torch.device]:
        modes = [(m, m.training) for m in self.model.modules()]
        device = next(self.model.parameters()).device
        dtype = AUTOCAST_DTYPES.get(self.precision or "")
        autocast = (torch.autocast(device_type="cuda", dtype=dtype) if device.type == "cuda" and dtype is not None
                    else contextlib.nullcontext())
        self.model.eval()
        try:
            # PrefixReplay needs version counters, which inference tensors do not have: no_grad for it.
            with (torch.inference_mode() if inference else torch.no_grad()), autocast:
                yield device
        finally:
            for module, training in modes:
                module.training = training

    def correct(self, at_least: int | None = None) -> tuple[int, int]:
        """``(correct predictions, images seen)`` on the split; ``seen == total`` for a complete pass. With
        ``at_least``, the pass stops as soon as even all remaining images being correct could not reach
        ``at_least`` correct (then ``correct + total - seen`` is an upper bound of the full count). Ignored with
        ``shard_data`` (every rank must run the same collectives)."""
        batches = self.batches()
        total = self.total
        if at_least is not None and self.shard_data:
            at_least = None
        correct = seen = 0
        self.evaluations += 1
        with self._evaluation_mode() as device:
            for inputs, labels in batches:
                if at_least is not None and correct + (total - seen) < at_least:
                    return correct, seen
                outputs = _first_tensor(call_model(self.model, move_to_device(inputs, device)))
                correct += _count_correct(outputs, labels)
                seen += int(labels.numel())
                self._count(labels.numel(), 1.0)
        if self.shard_data:
            correct, seen = self.collective.sum_ints([correct, seen])
        return correct, seen

    def _count(self, images: int, fraction: float) -> None:
        self.images += int(images)
        self.forward_equivalents += int(images) * float(fraction)

    def correct_trials(self, trials: Mapping[str, Callable[[], ContextManager]],
                       changed: Mapping[str, Sequence[torch.Tensor]], *, keep: int | None = None,
                       replay_mb: float | None = None, progress: bool = False,
                       recorded: RecordedPasses | None = None) -> tuple[int, dict[str, tuple[int, int]]]:
        """Correct counts of the unchanged model and of every trial, batch by batch, sharing their common prefix.

        For each batch the unchanged model runs once, recorded by :class:`~lightning_prune.structure.replay.
        PrefixReplay`; then each trial runs inside its context manager (``trials[name]()``, e.g. a mask), with
        the leaf-module calls before the first one holding a tensor of ``changed[name]`` replayed from the
        recording instead of computed. Bit-identical to separate full passes, so the counts are the same.

        ``keep``: early exit. A trial stops once even all its remaining images being correct could not bring it
        among the ``keep`` best (the ``keep``-th best lower bound of the others: their counts so far); its count
        plus its unseen images is then an upper bound below every trial that can still be chosen. Ignored with
        ``shard_data`` (every rank must run the same collectives).

        ``replay_mb``: memory for one batch's recorded outputs (default: a quarter of the free memory of the
        model's device). A batch that does not fit replays a shorter prefix (still exact, less saved) and warns
        once: lower ``eval_batch_size`` or raise ``replay_mb``.

        ``recorded``: the unchanged model's recorded passes of earlier calls with the same model (a lazy round's
        chunks), reused instead of running the unchanged model again, and extended with this call's passes while
        they fit its budget.

        Returns ``(baseline correct, {name: (correct, seen)})``, summed over the ranks with ``shard_data``.
        """
        batches, total = self.batches(), self.total
        if self.shard_data:
            keep = None
        names = list(trials)
        counts = dict.fromkeys(names, 0)
        seen = dict.fromkeys(names, 0)
        active = list(names)
        baseline = 0
        cuts: dict[str, int] = {}
        self.evaluations += len(names) + 1
        replay = PrefixReplay(self.model, replay_mb)
        with self._evaluation_mode(inference=False) as device, replay.attached():
            for index, (inputs, labels) in enumerate(_progress(batches, progress)):
                if keep is not None:
                    active = [n for n in active if not _cannot_rank(n, counts, seen[n], total, keep)]
                inputs = move_to_device(inputs, device)
                n = int(labels.numel())
                baseline += self._unchanged_pass(replay, index, inputs, labels, recorded, replay_mb)
                for name in active:
                    cut = cuts.setdefault(name, replay.cut_for(changed[name]))
                    with trials[name]():
                        outputs = replay.replay(lambda: _first_tensor(call_model(self.model, inputs)), cut)
                    counts[name] += _count_correct(outputs, labels)
                    seen[name] += n
                    self._count(n, replay.computed_fraction(cut))
        if self.shard_data:
            summed = self.collective.sum_ints([baseline] + [counts[n] for n in names] + [seen[n] for n in names])
            baseline, counts = summed[0], dict(zip(names, summed[1:1 + len(names)]))
            seen = dict(zip(names, summed[1 + len(names):]))
        return baseline, {name: (counts[name], seen[name]) for name in names}

    def _unchanged_pass(self, replay: PrefixReplay, index: int, inputs: Any, labels: torch.Tensor,
                        recorded: RecordedPasses | None, replay_mb: float | None) -> int:
        """Batch ``index`` of the unchanged model for the trials to replay: restored from ``recorded`` when an
        earlier call kept it, else run, recorded (and kept if it fits); its correct count."""
        if recorded is not None and index in recorded.passes:
            correct, recorded_pass = recorded.passes[index]
            replay.restore(recorded_pass)
            return correct
        correct = _count_correct(replay.record(lambda: _first_tensor(call_model(self.model, inputs))), labels)
        self._count(int(labels.numel()), 1.0)
        self._warn_if_truncated(replay, replay_mb)
        if recorded is not None:
            recorded.keep(index, correct, replay)
        return correct

    def _warn_if_truncated(self, replay: PrefixReplay, replay_mb: float | None) -> None:
        if replay.truncated and not self._warned_truncated:
            self._warned_truncated = True
            warnings.warn(
                f"sensitivity trials: one validation batch's layer outputs exceed the replay budget "
                f"({replay.budget_bytes / 2**20:.0f} MB, replay_mb={replay_mb!r}); only the first "
                f"{len(replay._outputs)} of {len(replay._calls)} layer calls are replayed (exact, but less is saved). "
                "Lower eval_batch_size or raise replay_mb.", RuntimeWarning, stacklevel=3)

    def __call__(self) -> float:
        correct, _ = self.correct()
        return correct / self.total if self.total else 0.0

