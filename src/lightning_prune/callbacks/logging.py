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
