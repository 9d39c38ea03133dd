"""Logging pruning events to Lightning loggers (TensorBoard first, any logger works, either namespace)."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from ..pruning import PruneReport
from .interop import tensorboard_loggers


@rank_zero_only
def log_baseline(trainer: pl.Trainer, flops: int, params: int, widths: dict[str, int], log_widths: bool) -> None:
    """The dense model's point of the ``prune/*`` curves (no channel removed yet), at the current global step."""
    metrics = {
        "prune/flops": float(flops),
        "prune/params": float(params),
        "prune/flops_reduction": 0.0,
        "prune/channel_sparsity": 0.0,
    }
    if log_widths:
        metrics.update({f"prune/width/{name}": float(width) for name, width in widths.items()})
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_dense_baseline(callback, trainer: pl.Trainer, pl_module: pl.LightningModule, event_due: bool) -> None:
    """The unpruned model's point of every ``prune/*`` curve, at the first training epoch of a fit that has not
    pruned yet. When an event is due at that epoch, its report's "before" numbers are logged instead (one trace
    fewer): ``callback._baseline_pending``."""
    from .interop import _event_graph
    from ..structure import count_flops, count_params

    if getattr(callback, "_baseline_logged", False) or callback.reports or not callback.plan.is_empty():
        return
    callback._baseline_logged = True
    if event_due:
        callback._baseline_pending = True
        return
    graph = _event_graph(callback, trainer, pl_module)
    callback.original_flops = count_flops(pl_module, graph.example_inputs)
    callback.original_params = count_params(pl_module)
    log_baseline(trainer, callback.original_flops, callback.original_params, graph.widths(), callback.log_widths)


@rank_zero_only
def log_prune_event(trainer: pl.Trainer, report: PruneReport, epoch: int) -> None:
    """Scalars of one event at the current global step, to every logger of the trainer."""
    metrics = {
        "prune/event/flops": float(report.flops_after),
        "prune/event/params": float(report.params_after),
        "prune/event/flops_reduction": report.flops_reduction,
        "prune/event/channel_sparsity": report.channel_sparsity,
        "prune/event/seconds": report.seconds,
        "prune/event/epoch": float(epoch),
    }
    if report.latency_ratio is not None:
        metrics["prune/event/latency_ms"] = float(report.latency_after_ms)
        metrics["prune/event/latency_reduction"] = float(report.latency_reduction)
        metrics["prune/event/predicted_latency_ms"] = float(report.predicted_latency_ms)
        if report.latency_error is not None:
            metrics["prune/event/latency_error"] = float(report.latency_error)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


@rank_zero_only
def log_widths_figure(trainer: pl.Trainer, original: dict[str, int], current: dict[str, int], epoch: int) -> None:
    """A bar chart of every group's original and current width, to TensorBoard loggers."""
    loggers = tensorboard_loggers(trainer)
    if not loggers:
        return
    figure = widths_figure(original, current, title=f"Channel widths after epoch-{epoch} pruning")
    for logger in loggers:
        logger.experiment.add_figure("prune/widths", figure, global_step=trainer.global_step, close=False)
    import matplotlib.pyplot as plt

    plt.close(figure)


def widths_figure(original: dict[str, int], current: dict[str, int], title: str = "Channel widths"):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(original)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4))
    positions = range(len(names))
    ax.bar(positions, [original[n] for n in names], color="#cccccc", label="original")
    ax.bar(positions, [current.get(n, original[n]) for n in names], color="#1f77b4", label="current")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
