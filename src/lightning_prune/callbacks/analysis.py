"""``CriteriaAnalysis``: run the criteria analysis of paper 1 at chosen epochs while training."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import pytorch_lightning as pl
import torch

from ..analysis import DEFAULT_CRITERIA, AnalysisReport, analyze
from ..structure.tracing import move_to_device, preserved_state


class CriteriaAnalysis(pl.Callback):
    """Analyse how pruning criteria behave on the model at the start of chosen training epochs.

    At ``on_train_epoch_start`` of every epoch in ``epochs`` (rank zero only) it runs
    :func:`lightning_prune.analysis.analyze` on the LightningModule in eval mode (train/eval flags, buffers and
    the RNG are restored afterwards), writes ``report.json`` and PNG figures to
    ``<dirpath or trainer.log_dir or default_root_dir>/criteria_analysis/epoch_XXX/`` and, when a
    ``TensorBoardLogger`` is attached, logs the summary scalars and figures at the current global step.

    Args:
        epochs: epoch numbers to analyse (an int, an iterable of ints, or ``None`` for every epoch).
        criteria: criteria to compare (names or instances; default L1, L2, FPGM).
        target: channel sparsity used by the analysis (see :func:`analyze`).
        example_inputs: inputs to trace with; default ``pl_module.example_input_array``, else two samples of
            the first training batch.
        dataloader: batches for data-driven criteria; default the trainer's training dataloader.
        scoring_batches: batches used by data-driven criteria (default 4).
        dirpath: output directory root (see above).
        figures: write PNGs and log figures (``False``: JSON and scalars only).
        **analyze_kwargs: further arguments of :func:`analyze` (``cv_threshold``, ``alpha``, ...).

    After a run, ``reports`` maps each analysed epoch to its :class:`AnalysisReport` and ``paths`` to the
    files written.

    The graph is traced afresh each time, so on an already pruned model the ratios are relative to the current
    widths.
    """

    def __init__(
        self,
        epochs: int | Iterable[int] | None = (0,),
        criteria: Sequence[Any] = DEFAULT_CRITERIA,
        *,
        target: float = 0.5,
        example_inputs: Any = None,
        dataloader: Iterable | None = None,
        scoring_batches: int | None = 4,
        dirpath: str | Path | None = None,
        figures: bool = True,
        **analyze_kwargs: Any,
    ):
        super().__init__()
        if epochs is None:
            self.epochs = None
        else:
            values = [epochs] if isinstance(epochs, int) else list(epochs)
            if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in values):
                raise ValueError(f"epochs must be None, an integer >= 0 or integers >= 0, got {epochs!r}.")
            self.epochs = set(values)
        if not 0.0 <= float(target) < 1.0:
            raise ValueError(f"target must be in [0, 1), got {target!r}.")
        self.criteria = list(criteria) if not isinstance(criteria, str) else [criteria]
        self.target = float(target)
        self.example_inputs = example_inputs
        self.dataloader = dataloader
        self.scoring_batches = scoring_batches
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.figures = bool(figures)
        self.analyze_kwargs = dict(analyze_kwargs)
        self.reports: dict[int, AnalysisReport] = {}
        self.paths: dict[int, list[Path]] = {}

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        inputs = self.example_inputs
        if inputs is None:
            inputs = getattr(pl_module, "example_input_array", None)
        if inputs is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise ValueError("CriteriaAnalysis: pass example_inputs=... (the module has no example_input_array "
                                 "and no training dataloader is available).")
            batch = next(iter(loader))
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(inputs, torch.Tensor):
                inputs = inputs[:2]
        return move_to_device(inputs, pl_module.device)

    def _output_dir(self, trainer: pl.Trainer, epoch: int) -> Path:
        root = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir)
        return Path(root) / "criteria_analysis" / f"epoch_{epoch:03d}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        if self.epochs is not None and epoch not in self.epochs:
            return
        if not trainer.is_global_zero:
            return
        report = self.run(trainer, pl_module)
        self.reports[epoch] = report

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AnalysisReport:
        """Analyse now (also usable outside the epoch hook) and write/log the results."""
        epoch = int(trainer.current_epoch)
        example_inputs = self._example_inputs(trainer, pl_module)
        dataloader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        with preserved_state(pl_module):
            pl_module.eval()
            report = analyze(
                pl_module, example_inputs, self.criteria, dataloader, target=self.target,
                scoring_batches=self.scoring_batches, device=pl_module.device,
                meta={"epoch": epoch, "global_step": int(trainer.global_step)}, **self.analyze_kwargs,
            )
        out = self._output_dir(trainer, epoch)
        paths = [report.to_json(out / "report.json")]
        figures = report.figures() if self.figures else {}  # rendered once, written and logged
        if figures:
            paths += report.save_figures(out, figures=figures)
        self.paths[epoch] = paths
        from .interop import tensorboard_loggers

        for logger in tensorboard_loggers(trainer):  # either Lightning namespace
            report.log_to_tensorboard(logger, step=int(trainer.global_step), figures=figures)
        return report
