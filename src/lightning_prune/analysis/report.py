"""The result of :func:`lightning_prune.analysis.analyze`: plain data, JSON, figures, TensorBoard, text."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .similarity import PAIR_SEP


def _plain(value: Any) -> Any:
    """Plain JSON data: numpy/torch scalars to Python, tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # tensors, arrays
        return _plain(value.tolist())
    if value is None or isinstance(value, str):
        return value
    return str(value)


@dataclass
class AnalysisReport:
    """Criteria analysis of one model state (paper 1). Every field is plain JSON data.

    Attributes:
        criteria: criterion names, in the order analysed.
        target: the channel sparsity used for top-k overlaps, gaps and global ratios.
        settings: the parameters of the analysis (``topk_fraction``, ``cv_threshold``, ``alpha``, ...).
        groups: ``{group: {"size", "original_size", "d"}}`` (``d``: length of the group's concatenated filters).
        scores: ``{criterion: {group: [score per channel]}}``.
        similarity: ``{group: {"a|b": {"spearman", "kendall", "topk_jaccard"}}}``.
        global_similarity: ``{"a|b": {"spearman", "kendall", "topk_jaccard" (all channels pooled, as one global
            threshold sees them), "mean_spearman", "min_spearman", "mean_topk_jaccard" (over groups)}}``.
        global_ratios: ``{criterion: {group: sparsity}}`` one global threshold at ``target`` yields.
        applicability: ``{group: {criterion: {"cv", "gap", "margin", "applicable"}}}``.
        cwda: ``{conv layer: CWDA test results}`` (see :mod:`lightning_prune.analysis.cwda`).
        meta: free-form context (model class, epoch, ...).
    """

    criteria: list[str]
    target: float
    settings: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    similarity: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    global_similarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    applicability: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    cwda: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))

    # -- serialization ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisReport":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"AnalysisReport: unknown fields {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "AnalysisReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- queries ---------------------------------------------------------------------------------------------------
    @property
    def pairs(self) -> list[str]:
        return list(self.global_similarity)

    def not_applicable(self, criterion: str) -> list[str]:
        """Groups where ``criterion``'s scores are too close together (CV below the threshold)."""
        return [g for g, per in self.applicability.items() if not per.get(criterion, {}).get("applicable", True)]

    def spearman(self, a: str, b: str, group: str | None = None) -> float | None:
        """Spearman ρ between criteria ``a`` and ``b`` in ``group`` (or pooled over all groups)."""
        key = f"{a}{PAIR_SEP}{b}"
        if key not in self.global_similarity:
            key = f"{b}{PAIR_SEP}{a}"
        table = self.global_similarity if group is None else self.similarity[group]
        return table[key]["spearman"]

    def summary(self) -> str:
        """A short text table: per group, the minimum pairwise ρ, each criterion's CV (``*`` = not applicable)
        and the global-threshold ratios; then the CWDA verdicts."""
        def fmt(x: Any, spec: str = ".2f") -> str:
            return "-" if x is None else format(x, spec)

        lines = [f"Criteria analysis: {', '.join(self.criteria)} at target {self.target:g}"]
        header = f"{'group':<28} {'size':>5} {'min rho':>8} " + " ".join(
            f"{'cv ' + c:>10}" for c in self.criteria) + " " + " ".join(f"{'glob ' + c:>10}" for c in self.criteria)
        lines += [header, "-" * len(header)]
        for group, info in self.groups.items():
            rhos = [v["spearman"] for v in self.similarity.get(group, {}).values() if v["spearman"] is not None]
            cvs = []
            for c in self.criteria:
                entry = self.applicability.get(group, {}).get(c, {})
                mark = "" if entry.get("applicable", True) else "*"
                cvs.append(f"{fmt(entry.get('cv'), '.3f') + mark:>10}")
            ratios = [f"{fmt(self.global_ratios.get(c, {}).get(group)):>10}" for c in self.criteria]
            lines.append(f"{group[:28]:<28} {info.get('size', 0):>5} {fmt(min(rhos) if rhos else None):>8} "
                         + " ".join(cvs) + " " + " ".join(ratios))
        for key, entry in self.global_similarity.items():
            lines.append(f"{key}: pooled rho {fmt(entry['spearman'])}, mean rho {fmt(entry['mean_spearman'])}, "
                         f"mean top-k overlap {fmt(entry['mean_topk_jaccard'])}")
        if self.cwda:
            gaussian = [name for name, entry in self.cwda.items() if entry.get("gaussian")]
            lines.append(f"CWDA: {len(gaussian)}/{len(self.cwda)} conv layers not rejected as Gaussian "
                         f"(alpha={self.settings.get('alpha')})")
        return "\n".join(lines)

    # -- figures ---------------------------------------------------------------------------------------------------
    def figures(self, max_panels: int = 16) -> dict[str, Any]:
        """matplotlib figures by name: ``similarity_heatmap``, ``score_histograms``, ``global_ratios``,
        ``qq_plots`` (those with data). Grids show at most ``max_panels`` groups/layers, evenly spaced in
        depth. The caller closes them (``matplotlib.pyplot.close(fig)``)."""
        # Figures are built with the object-oriented API and an Agg canvas: no pyplot state, no backend switch,
        # safe in headless training jobs and notebooks alike.
        plt = _FigureFactory()
        built = {"similarity_heatmap": self._similarity_heatmap(plt),
                 "score_histograms": self._score_histograms(plt, max_panels),
                 "global_ratios": self._global_ratios_figure(plt),
                 "qq_plots": self._qq_plots(plt, max_panels)}
        return {name: fig for name, fig in built.items() if fig is not None}

    def _similarity_heatmap(self, plt: Any) -> Any:
        groups, pairs = list(self.groups), self.pairs
        if not (groups and pairs):
            return None
        matrix = np.array([[np.nan if self.similarity[g][p]["spearman"] is None else self.similarity[g][p]["spearman"]
                            for p in pairs] for g in groups], dtype=float)
        fig, ax = plt.subplots(figsize=(2.0 + 1.2 * len(pairs), 1.5 + 0.3 * len(groups)))
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        ax.set_xticks(range(len(pairs)), [p.replace(PAIR_SEP, " vs ") for p in pairs], rotation=30, ha="right")
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        if matrix.size <= 400:
            for (i, j), v in np.ndenumerate(matrix):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, label="Spearman rho")
        ax.set_title("Per-layer rank correlation of criteria")
        fig.tight_layout()
        return fig

    def _score_histograms(self, plt: Any, max_panels: int) -> Any:
        shown = _spaced(list(self.groups), max_panels)
        if not (shown and self.scores):
            return None
        fig, axes = _grid(plt, len(shown))
        for ax, g in zip(axes, shown):
            for c in self.criteria:
                s = np.asarray(self.scores.get(c, {}).get(g, []), dtype=float)
                mean = np.abs(s.mean()) if s.size else 0.0
                if s.size and mean > 0:
                    ax.hist(s / mean, bins=min(30, max(5, s.size // 2)), alpha=0.5, label=c)
            ax.set_title(g, fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0].legend(fontsize=6)
        for ax in axes[len(shown):]:
            ax.axis("off")
        fig.suptitle("Scores / mean score per group", fontsize=9)
        fig.tight_layout()
        return fig

    def _global_ratios_figure(self, plt: Any) -> Any:
        groups = list(self.groups)
        if not (groups and self.global_ratios):
            return None
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(groups) * max(1, len(self.criteria))), 3.5))
        width = 0.8 / max(1, len(self.criteria))
        for i, c in enumerate(self.criteria):
            values = [self.global_ratios.get(c, {}).get(g) or 0.0 for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, values, width=width, label=c)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("pruned fraction")
        ax.set_ylim(0, 1)
        ax.set_title(f"Per-group ratios of one global threshold at {self.target:g}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def _qq_plots(self, plt: Any, max_panels: int) -> Any:
        layers = _spaced([n for n, e in self.cwda.items() if e.get("qq")], max_panels)
        if not layers:
            return None
        from scipy import stats

        fig, axes = _grid(plt, len(layers))
        for ax, name in zip(axes, layers):
            entry = self.cwda[name]
            theory = stats.norm.ppf(entry["qq_probabilities"])
            ax.plot(theory, entry["qq"], ".", markersize=3)
            lim = float(max(np.abs(theory).max(), np.abs(entry["qq"]).max()))
            ax.plot([-lim, lim], [-lim, lim], "k--", linewidth=0.7)
            verdict = "gaussian" if entry.get("gaussian") else "rejected"
            ax.set_title(f"{name} ({verdict}, KS p={entry.get('ks_pvalue') or 0:.2g})", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in axes[len(layers):]:
            ax.axis("off")
        fig.suptitle("QQ plots of standardized weights vs N(0,1)", fontsize=9)
        fig.tight_layout()
        return fig

    def save_figures(self, directory: str | Path, max_panels: int = 16, dpi: int = 100,
                     figures: dict[str, Any] | None = None) -> list[Path]:
        """Write the :meth:`figures` (or the already built ``figures``) as PNGs into ``directory``; returns
        their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, fig in (self.figures(max_panels) if figures is None else figures).items():
            path = directory / f"{name}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
        return paths

    # -- TensorBoard -----------------------------------------------------------------------------------------------
    def scalars(self) -> dict[str, float]:
        """Flat ``{tag: value}`` summary for loggers."""
        out: dict[str, float] = {}
        for key, entry in self.global_similarity.items():
            tag = key.replace(PAIR_SEP, "_vs_")
            for metric in ("mean_spearman", "min_spearman", "mean_topk_jaccard", "spearman"):
                if entry.get(metric) is not None:
                    name = "pooled_spearman" if metric == "spearman" else metric
                    out[f"criteria_analysis/{name}/{tag}"] = float(entry[metric])
        for c in self.criteria:
            cvs = [per[c]["cv"] for per in self.applicability.values() if c in per and per[c]["cv"] is not None]
            if cvs:
                out[f"criteria_analysis/mean_cv/{c}"] = float(np.mean(cvs))
            if self.applicability:
                out[f"criteria_analysis/not_applicable_fraction/{c}"] = len(self.not_applicable(c)) / len(self.applicability)
        if self.cwda:
            out["criteria_analysis/cwda_gaussian_fraction"] = sum(bool(e.get("gaussian")) for e in self.cwda.values()) / len(self.cwda)
        return out

    def log_to_tensorboard(self, logger_or_writer: Any, step: int = 0, figures: bool | dict[str, Any] = True,
                           max_panels: int = 16) -> None:
        """Log :meth:`scalars` and (``figures=True``, or a dict of already built figures) the :meth:`figures`
        via ``add_figure``.

        Accepts a ``torch.utils.tensorboard.SummaryWriter`` or a Lightning ``TensorBoardLogger`` (its
        ``experiment``)."""
        writer = getattr(logger_or_writer, "experiment", logger_or_writer)
        if not hasattr(writer, "add_scalar"):
            raise TypeError(f"logger_or_writer must be a TensorBoard SummaryWriter or TensorBoardLogger, got "
                            f"{type(logger_or_writer).__name__}")
        for tag, value in self.scalars().items():
            writer.add_scalar(tag, value, step)
        if figures:
            built = figures if isinstance(figures, dict) else self.figures(max_panels)
            for name, fig in built.items():
                writer.add_figure(f"criteria_analysis/{name}", fig, step, close=False)
        if hasattr(writer, "flush"):
            writer.flush()


class _FigureFactory:
    """``plt.subplots`` look-alike that makes a standalone Agg ``Figure`` (no pyplot global state)."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _spaced(items: list[str], limit: int) -> list[str]:
    if len(items) <= limit:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in picks]


def _grid(plt: Any, count: int) -> tuple[Any, list[Any]]:
    cols = min(4, count)
    rows = int(math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    return fig, list(axes.ravel())
