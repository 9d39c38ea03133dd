"""Overhead of one pruning event inside a Lightning training run, as a fraction of a training epoch.

A real ``pl.Trainer`` fit (CPU, CSV logger, no progress bar, no checkpointing, no validation) trains a CIFAR
ResNet-56 (:class:`~lightning_prune.classification.ClassificationModule`, SGD 0.1 + cosine, batch 128) on a
synthetic ``TensorDataset`` of CIFAR-sized images (3×32×32, 10 classes, fixed seed). A
:class:`~lightning_prune.callbacks.PruneCallback` removes ``--amount`` of the channels (uniform allocation) in one
event at the start of epoch 1; epoch 0 is a plain, dense epoch. One fit per criterion: the weight criteria
``l1``, ``l2``, ``fpgm``, and the data-driven ``taylor`` (``scoring_batches=8`` training batches) for context.

Measured per fit, with ``time.perf_counter``:

* **dense epoch**: wall time of epoch 0, from the first ``on_train_epoch_start`` to ``on_train_epoch_end``;
* **event**: wall time of the ``PruneCallback.on_train_epoch_start`` hook of epoch 1 (the whole event: graph
  build, scoring, allocation, surgery with its forward checks, optimizer transplant, fvcore FLOPs counts,
  logging);
* the event broken down by wrapping, from outside and only for the duration of the fit, the functions the
  callback calls (``src/`` is not modified): ``DependencyGraph`` construction, ``count_flops`` (original count,
  first event only), ``FlopsModel`` (per-module fvcore count before), ``score_groups``, ``choose_removals``,
  ``DependencyGraph.prune_groups`` (surgery + forward check), ``transplant_optimizer``, the fvcore count after,
  and the loggers; "other" is the remainder (widths, parameter counts, plan bookkeeping).

The event cost does not depend on the epoch size, so the fraction is also extrapolated to a full CIFAR-10 epoch of
50,000 images: ``event / (dense epoch × 50000 / N)``. Goal of the issue: under 2% with weight criteria.

Before the timed fits a throw-away one-shot prune of a ResNet-20 runs once, so one-time import and first-trace
costs (fvcore, Torch-Pruning, JIT tracer) are not charged to the first criterion; its time is reported apart.

Usage::

    python benchmarks/overhead.py                 # full run: N=10000 (1/5 CIFAR epoch), 4 criteria, 1 thread
    python benchmarks/overhead.py --quick         # smoke test: N=512, l1 and taylor, < 2 minutes
    python benchmarks/overhead.py --images 50000  # a real CIFAR-sized epoch (slow on a small CPU)

Writes Markdown to ``docs/benchmarks/overhead.md`` (``--quick`` writes to the temporary directory instead, unless
``--out``, so smoke numbers never overwrite the real table) and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
from _common import machine_description, write_results  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

import lightning_prune.callbacks.prune as callback_module  # noqa: E402
import lightning_prune.criteria.scoring as scoring_module  # noqa: E402
import lightning_prune.allocation.strategies as strategies_module  # noqa: E402
import lightning_prune.pruning as pruning_module  # noqa: E402
import lightning_prune.structure.flops as flops_module  # noqa: E402
import lightning_prune.structure.graph as graph_module  # noqa: E402
from lightning_prune.callbacks import PruneCallback  # noqa: E402
from lightning_prune.classification import ClassificationModule  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "overhead.md"
CIFAR_EPOCH = 50_000
WEIGHT_CRITERIA = ("l1", "l2", "fpgm")
ALL_CRITERIA = ("l1", "l2", "fpgm", "taylor")
GOAL = 0.02
# Event parts, in the order they happen, with their column titles.
PARTS = {
    "graph": "graph build",
    "flops_original": "original FLOPs",
    "flops_model": "FlopsModel",
    "scoring": "scoring",
    "allocation": "allocation",
    "surgery": "surgery",
    "transplant": "optimizer transplant",
    "flops_after": "FLOPs after",
    "logging": "logging",
}


# -- timing -------------------------------------------------------------------------------------------------------
class PartTimer:
    """Accumulates wall time per label of functions wrapped with :meth:`patch` (restored by :meth:`restore`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def patch(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:  # the library was refactored: that part lands in "other"
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        self._undo.append((owner, attr, original))
        setattr(owner, attr, self.wrap(label, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


@contextmanager
def instrumented(timer: PartTimer) -> Iterator[PartTimer]:
    """Wrap the functions the callback's event calls. Each name is patched where it is looked up, so nothing is
    counted twice: ``pruning.count_flops`` (the count after surgery) and ``flops.count_flops`` (called by
    ``FlopsModel``) are separate bindings of the same function."""
    timer.patch(callback_module, "DependencyGraph", "graph")
    timer.patch(callback_module, "count_flops", "flops_original")
    timer.patch(flops_module, "count_flops", "flops_model")
    timer.patch(scoring_module, "score_groups", "scoring")
    timer.patch(strategies_module, "choose_removals", "allocation")
    timer.patch(graph_module.DependencyGraph, "prune_groups", "surgery")
    timer.patch(callback_module, "transplant_optimizer", "transplant")
    timer.patch(pruning_module, "count_flops", "flops_after")
    timer.patch(callback_module, "log_prune_event", "logging")
    timer.patch(callback_module, "log_widths_figure", "logging")
    try:
        yield timer
    finally:
        timer.restore()


class TimedPruneCallback(PruneCallback):
    """``PruneCallback`` whose epoch-start hook (the pruning event) is timed, with its parts."""

    def __init__(self, *args: Any, part_timer: PartTimer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.part_timer = part_timer
        self.timed_events: list[dict[str, Any]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = len(self.reports)
        self.part_timer.reset()
        start = time.perf_counter()
        super().on_train_epoch_start(trainer, pl_module)
        seconds = time.perf_counter() - start
        if len(self.reports) > before:
            self.timed_events.append({
                "epoch": trainer.current_epoch,
                "seconds": seconds,
                "parts": dict(self.part_timer.seconds),
                "calls": dict(self.part_timer.calls),
                "report": self.reports[-1],
            })


class EpochTimer(Callback):
    """Wall time of each training epoch (first callback's epoch start to epoch end)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds[trainer.current_epoch] = time.perf_counter() - self._start


# -- one fit ------------------------------------------------------------------------------------------------------
def synthetic_cifar(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def run_fit(criterion: str, dataset: torch.utils.data.TensorDataset, args: argparse.Namespace,
            log_dir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    module = ClassificationModule(model=args.model, num_classes=10, lr=0.1, example_input_shape=(3, 32, 32))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    timer = PartTimer()
    epochs = EpochTimer()
    prune_cb = TimedPruneCallback(amount=args.amount, criterion=criterion, epochs=[args.prune_epoch],
                                  scoring_batches=args.scoring_batches, verbose=False, part_timer=timer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.prune_epoch + 1,
        logger=pl.loggers.CSVLogger(log_dir, name=criterion), callbacks=[epochs, prune_cb],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
    )
    with instrumented(timer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        start = time.perf_counter()
        trainer.fit(module, loader)
        wall = time.perf_counter() - start
    if not prune_cb.timed_events:
        raise RuntimeError(f"{criterion}: no pruning event happened (see the warnings above)")
    event = prune_cb.timed_events[0]
    dense = statistics.fmean(epochs.seconds[e] for e in range(args.prune_epoch))
    pruned_epoch = epochs.seconds[args.prune_epoch]
    return {
        "criterion": criterion, "dense_epoch": dense, "event": event["seconds"], "parts": event["parts"],
        "calls": event["calls"], "pruned_epoch": pruned_epoch, "pruned_train": pruned_epoch - event["seconds"],
        "flops_reduction": event["report"]["flops_reduction"],
        "channel_sparsity": event["report"]["channel_sparsity"], "fit_wall": wall, "unwrapped": timer.missing,
    }


def warm_up() -> float:
    """One-shot prune + FLOPs count of a small model, so one-time costs are not charged to the first fit."""
    from lightning_prune.models import create_model
    from lightning_prune.pruning import prune

    start = time.perf_counter()
    model = create_model("resnet20", num_classes=10)
    prune(model, torch.zeros(2, 3, 32, 32), criterion="l1", amount=0.3)
    return time.perf_counter() - start


# -- output -------------------------------------------------------------------------------------------------------
def render(results: list[dict[str, Any]], args: argparse.Namespace, warm_s: float, started: str,
           machine: list[str], finished: bool, total_s: float | None) -> str:
    n, batches = args.images, -(-args.images // args.batch_size)
    scale = CIFAR_EPOCH / n
    command = "python benchmarks/overhead.py" + (" --quick" if args.quick else "")
    lines = [
        f"# Overhead of a pruning event: {args.model} on CIFAR-sized data",
        "",
        f"Generated by `{command}` (`--images {n} --amount {args.amount:g} --threads {args.threads}`), started "
        f"{started}" + ("." if finished else "; **run in progress** (partial results)."),
        "",
        f"A `pl.Trainer` fit (CPU, CSV logger, no progress bar/checkpointing/validation) of `{args.model}` "
        f"(`ClassificationModule`, SGD 0.1 + cosine) on **{n:,} synthetic 3×32×32 images** (batch "
        f"{args.batch_size}, {batches} steps per epoch; a full CIFAR-10 epoch is {CIFAR_EPOCH:,} images). "
        f"`PruneCallback(amount={args.amount:g}, epochs=[{args.prune_epoch}])` removes {args.amount:.0%} of the "
        f"prunable channels (uniform allocation) in one event at the start of epoch {args.prune_epoch}; earlier "
        f"epochs are dense. Data-driven criteria score {args.scoring_batches} training batches. One fit per "
        "criterion; times are wall seconds (`time.perf_counter`).",
        "",
        "- **dense epoch**: wall time of a dense training epoch (epoch 0: first `on_train_epoch_start` to "
        "`on_train_epoch_end`).",
        "- **event**: wall time of `PruneCallback.on_train_epoch_start` at the pruning epoch, i.e. the whole event.",
        f"- **% of epoch**: event / dense epoch, for this {n:,}-image epoch; **% of CIFAR epoch**: event / "
        f"(dense epoch × {CIFAR_EPOCH:,} / {n:,}), extrapolated to {CIFAR_EPOCH:,} images (the event cost does not "
        "depend on the epoch size). Goal: < 2% with weight criteria.",
        "- **pruned epoch train**: the pruning epoch's training time without the event (the smaller model trains "
        "faster).",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Results",
        "",
        "| criterion | dense epoch s | event s | % of epoch | % of CIFAR epoch | goal < 2% | pruned epoch train s "
        "| FLOPs removed | channels removed |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        fraction = r["event"] / r["dense_epoch"]
        full = fraction / scale
        met = "yes" if full < GOAL else "no"
        goal = (met if met == "yes" else "**no**") if r["criterion"] in WEIGHT_CRITERIA else f"({met}, data-driven)"
        lines.append(
            f"| {r['criterion']} | {r['dense_epoch']:.1f} | {r['event']:.2f} | {fraction:.2%} | {full:.2%} | {goal} "
            f"| {r['pruned_train']:.1f} | {r['flops_reduction']:.1%} | {r['channel_sparsity']:.1%} |"
        )
    lines += [
        "",
        "## Where the event's time goes",
        "",
        "Seconds per part, measured by wrapping the functions the callback calls (from the benchmark script; the "
        "library is unmodified). *graph build*: `DependencyGraph` (Torch-Pruning trace + grouping); *original "
        "FLOPs*: the fvcore count the callback makes at its first event only; *FlopsModel*: the per-module fvcore "
        "count `prune_event` makes before allocating; *scoring*: `score_groups`; *allocation*: `choose_removals`; "
        "*surgery*: `DependencyGraph.prune_groups` (physical removal + eval/train forward check); *optimizer "
        "transplant*: `transplant_optimizer` (SGD momentum sliced); *FLOPs after*: the fvcore count of the pruned "
        "model; *logging*: `log_prune_event` + `log_widths_figure`; *other*: the rest of the hook (widths, "
        "parameter counts, plan bookkeeping, `log_dict`).",
        "",
        "| criterion | " + " | ".join(PARTS.values()) + " | other | event |",
        "|---|" + "---:|" * (len(PARTS) + 2),
    ]
    for r in results:
        parts = r["parts"]
        other = r["event"] - sum(parts.get(k, 0.0) for k in PARTS)
        cells = [f"{parts.get(k, 0.0):.3f}" for k in PARTS]
        lines.append(f"| {r['criterion']} | " + " | ".join(cells) + f" | {other:.3f} | {r['event']:.3f} |")
    fvcore_s = [sum(r["parts"].get(k, 0.0) for k in ("flops_original", "flops_model", "flops_after")) for r in results]
    lines += [
        "",
        f"fvcore counting (original + FlopsModel + after) takes {statistics.fmean(fvcore_s):.2f} s per event on "
        "average; the first event of a run pays for the original count, later events do not.",
        "",
        f"One-time warm-up before the fits (imports, first trace: a one-shot prune of a ResNet-20): {warm_s:.2f} s, "
        "not included above.",
        "",
    ]
    unwrapped = sorted({name for r in results for name in r["unwrapped"]})
    if unwrapped:
        lines += [f"Not found in the library, so counted under *other*: {', '.join(f'`{n}`' for n in unwrapped)}.", ""]
    if total_s is not None:
        lines.append(f"Total wall time {total_s:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 512 images, criteria l1 and taylor")
    parser.add_argument("--criteria", nargs="+", default=None, help=f"default: {' '.join(ALL_CRITERIA)}")
    parser.add_argument("--model", default="resnet56", help="registry name of a CIFAR model (default resnet56)")
    parser.add_argument("--images", type=int, default=None, help="synthetic training images per epoch "
                        "(default 10000, 512 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--amount", type=float, default=0.3, help="fraction of channels removed (default 0.3)")
    parser.add_argument("--prune-epoch", type=int, default=1, help="epoch of the event; earlier epochs are dense")
    parser.add_argument("--scoring-batches", type=int, default=8, help="batches data-driven criteria see")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.prune_epoch < 1:
        parser.error("--prune-epoch must be >= 1 (epoch 0 is the dense reference epoch)")
    args.images = args.images or (512 if args.quick else 10_000)
    criteria = args.criteria or (["l1", "taylor"] if args.quick else list(ALL_CRITERIA))
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "overhead-quick.md" if args.quick else DEFAULT_OUT
    torch.set_num_threads(max(1, args.threads))

    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = machine_description(args.threads)
    wall = time.perf_counter()
    warm_s = warm_up()
    dataset = synthetic_cifar(args.images)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lp-overhead-") as log_dir:
        for criterion in criteria:
            r = run_fit(criterion, dataset, args, log_dir)
            results.append(r)
            print(f"[{criterion}] dense epoch {r['dense_epoch']:.1f} s, event {r['event']:.2f} s "
                  f"({r['event'] / r['dense_epoch']:.2%} of this epoch, "
                  f"{r['event'] / (r['dense_epoch'] * CIFAR_EPOCH / args.images):.2%} of a CIFAR epoch), "
                  f"pruned epoch train {r['pruned_train']:.1f} s", flush=True)
            write_results(args.out, render(results, args, warm_s, started, machine, finished=False, total_s=None))
    table = render(results, args, warm_s, started, machine, finished=True, total_s=time.perf_counter() - wall)
    print()
    print(table)
    write_results(args.out, table)
    print(f"written to {args.out}")
    return table


if __name__ == "__main__":
    main()
