""":func:`analyze`: run the criteria analysis of paper 1 on a model."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import check_fraction
from ..structure import DependencyGraph
from ..structure.tracing import preserved_state
from .applicability import applicability
from .cwda import cwda_layers
from .report import AnalysisReport
from .similarity import global_ratios, global_similarity, group_similarity

DEFAULT_CRITERIA = ("l1", "l2", "fpgm")


def _resolve_criteria(criteria: Iterable[Any]) -> list[tuple[str, Any]]:
    from ..criteria import Criterion, get

    if isinstance(criteria, (str, Criterion)):
        criteria = [criteria]
    resolved = []
    for spec in criteria:
        criterion = get(spec)
        name = spec.lower() if isinstance(spec, str) else getattr(criterion, "name", type(criterion).__name__)
        resolved.append((name, criterion))
    names = [n for n, _ in resolved]
    if not names:
        raise ValueError("criteria: at least one criterion is needed (e.g. ('l1', 'l2', 'fpgm')).")
    if len(set(names)) != len(names):
        raise ValueError(f"criteria: names must be unique, got {names}")
    return resolved


def analyze(
    model: nn.Module,
    example_inputs: Any,
    criteria: Sequence[Any] = DEFAULT_CRITERIA,
    dataloader: Iterable | None = None,
    *,
    target: float = 0.5,
    graph: DependencyGraph | None = None,
    topk_fraction: float = 0.5,
    cv_threshold: float = 0.1,
    alpha: float = 0.01,
    n_projections: int = 10,
    seed: int = 0,
    max_samples: int | None = 5000,
    global_max_group_sparsity: float = 1.0,
    cwda: bool = True,
    scoring_batches: int | None = None,
    batch_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    device: Any = None,
    meta: dict | None = None,
) -> AnalysisReport:
    """Compare pruning criteria on ``model`` (paper 1): similarity, applicability, global ratios, CWDA.

    Args:
        model: the network (not modified: train/eval flags, buffers and the RNG are restored).
        example_inputs: inputs to trace the dependency graph with (ignored when ``graph`` is given).
        criteria: criterion names (``lightning_prune.criteria.available()``) or instances; default L1, L2, FPGM.
        dataloader: batches for data-driven criteria (required by them, unused by weight criteria); scored with
            ``lightning_prune.criteria.scoring.score_groups`` and ``scoring_batches``/``batch_fn``/``loss_fn``/
            ``device``.
        target: channel sparsity at which pruned sets are compared (top-k overlaps, kept/pruned gaps, the
            global threshold's per-group ratios).
        graph: a :class:`DependencyGraph` of ``model`` (e.g. the pruning callback's, so widths are relative to
            the original model); built here when omitted, and then ratios are relative to the current widths.
        topk_fraction: fraction of a group's channels whose pruned (lowest-scored) sets are compared by
            Jaccard overlap (default 0.5).
        cv_threshold: groups where a criterion's CV = std/mean is below it are flagged "not applicable".
        alpha, n_projections, seed, max_samples: CWDA test settings (:mod:`lightning_prune.analysis.cwda`).
        global_max_group_sparsity: cap used for the global-threshold ratios (default 1.0: uncapped).
        cwda: run the CWDA tests on every conv layer.
        meta: extra context stored in the report.

    Raises:
        ValueError: naming ``dataloader`` when a data-driven criterion is requested without one.
    """
    target = check_fraction("target", target)
    resolved = _checked_criteria(criteria, dataloader, topk_fraction)
    with preserved_state(model):
        if graph is None:
            graph = DependencyGraph(model, example_inputs)
        groups = graph.groups
        names = [g.name for g in groups]
        scores = {name: _criterion_scores(model, groups, criterion, dataloader, scoring_batches=scoring_batches,
                                          batch_fn=batch_fn, loss_fn=loss_fn, device=device)
                  for name, criterion in resolved}
        group_info = {g.name: _group_info(g) for g in groups}
        similarity = group_similarity(scores, names, topk_fraction)
        pooled = global_similarity(scores, names, similarity, topk_fraction)
        ratios = global_ratios(groups, scores, target, global_max_group_sparsity) if groups else {}
        applic = {g: {c: applicability(scores[c][g], target, cv_threshold) for c in scores} for g in names}
        cwda_results = (cwda_layers(model, alpha=alpha, n_projections=n_projections, seed=seed,
                                    max_samples=max_samples) if cwda else {})

    settings = {
        "topk_fraction": topk_fraction, "cv_threshold": cv_threshold, "alpha": alpha, "n_projections": n_projections,
        "seed": seed, "max_samples": max_samples, "global_max_group_sparsity": global_max_group_sparsity,
        "scoring_batches": scoring_batches,
    }
    info = {"model": type(model).__name__}
    info.update(meta or {})
    return AnalysisReport(
        criteria=list(scores), target=target, settings=settings, groups=group_info,
        scores={c: {g: v.tolist() for g, v in per.items()} for c, per in scores.items()},
        similarity=similarity, global_similarity=pooled, global_ratios=ratios, applicability=applic,
        cwda=cwda_results, meta=info,
    )


def _checked_criteria(criteria: Sequence[Any], dataloader: Iterable | None,
                      topk_fraction: Any) -> list[tuple[str, Any]]:
    """``analyze``'s checks before any work: ``topk_fraction``, the criteria, data for the data-driven ones."""
    if isinstance(topk_fraction, bool) or not isinstance(topk_fraction, (int, float)) or not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be a number in (0, 1], got {topk_fraction!r}.")
    resolved = _resolve_criteria(criteria)
    data_driven = [name for name, c in resolved if getattr(c, "requires_data", False)]
    if data_driven and dataloader is None:
        raise ValueError(
            f"dataloader is required: criteria {data_driven} are data-driven (they score activations), so "
            "pass dataloader=... (a few training batches), or use weight criteria such as 'l1', 'l2', 'fpgm'."
        )
    return resolved


def _criterion_scores(model: nn.Module, groups: Sequence[Any], criterion: Any, dataloader: Iterable | None,
                      **scoring: Any) -> dict[str, torch.Tensor]:
    """One criterion's scores per group, as flat float64 CPU tensors (data-driven ones observe ``dataloader``)."""
    if getattr(criterion, "requires_data", False):
        from ..criteria.scoring import score_groups  # written alongside; imported lazily

        per_group = score_groups(model, groups, criterion, dataloader, **scoring)
    else:
        per_group = {g.name: criterion.score(g) for g in groups}
    return {g.name: torch.as_tensor(per_group[g.name], dtype=torch.float64).detach().flatten().cpu() for g in groups}


def _group_info(group: Any) -> dict[str, Any]:
    """Width, original width and filter dimension ``d`` (None where the group has no single filter shape)."""
    try:
        d = int(group.filters().shape[1])
    except ValueError:
        d = None
    return {"size": group.size, "original_size": group.original_size, "d": d}
