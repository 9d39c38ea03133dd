"""Criteria analysis (paper 1) and FLOP-normalized sensitivity allocation (paper 2) on real data.

Same data, model and training as ``benchmarks/criteria.py`` (scikit-learn digits upscaled to 32×32, CIFAR
ResNet-20, Adam + cosine), whose helpers are imported from there.

1. **Analysis** of the seed-0 base ResNet-20 with :func:`lightning_prune.analysis.analyze`: layerwise Spearman ρ
   per pair of criteria (L1, L2, FPGM, BN-γ, Taylor, SD), the per-group ratios of one global threshold under L1
   vs L2, applicability (score CV) and the CWDA tests; then a short comparison with what paper 1 reports, computed
   from the numbers.
2. **Allocation**: for every seed, the base model is pruned with L1 scores to the same FLOPs reduction with
   ``allocation="uniform"``, ``"global"`` and ``"sensitivity"`` (:func:`lightning_prune.prune`; sensitivity
   measures accuracy on the validation split, never the test split), fine-tuned the same short way, and
   evaluated on the test split.

    python benchmarks/analysis.py --bases /tmp/lp/bases   # full run: 3 seeds, reuses criteria.py's base models
    python benchmarks/analysis.py --quick                 # smoke test, 1 seed, a few minutes on one CPU thread

Base models: ``--bases DIR`` loads ``DIR/resnet20_seed{seed}.pt`` (saved by ``criteria.py --save-base DIR``) when
the file exists; otherwise the base is trained here with the same call as in ``criteria.py``.

Writes Markdown to ``docs/benchmarks/analysis.md`` and the :class:`~lightning_prune.analysis.AnalysisReport`
JSON, the allocation results JSON and two figures (ρ heatmap, QQ plots) to ``docs/benchmarks/analysis/``
(``--quick`` writes to the temporary directory instead, unless ``--out``/``--artifacts``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from criteria import (  # noqa: E402
    NUM_CLASSES, accuracy, batches, fmt, load_digits_splits, make_model, resize, train,
)

from lightning_prune import prune, recalibrate_batchnorm  # noqa: E402
from lightning_prune.analysis import AnalysisReport, analyze, global_ratios  # noqa: E402
from lightning_prune.criteria import BNScale, get  # noqa: E402
from lightning_prune.structure import DependencyGraph, count_flops, count_params  # noqa: E402

MODEL = "resnet20"
IMAGE_SIZE = 32
ALL_CRITERIA = ["l1", "l2", "fpgm", "bn_scale", "taylor", "sd"]
QUICK_CRITERIA = ["l1", "l2", "fpgm", "sd"]
WEIGHT_CRITERIA = ("l1", "l2", "fpgm", "bn_scale")  # paper 1's "norm-based" family (BN-γ included)
# "sensitivity+bn": the same, re-estimating BatchNorm statistics on 4 training batches before every trial.
# "global+normalized": global allocation of "l1+normalized" scores (each group's L1 norms divided by their mean).
ALLOCATIONS = ("uniform", "global", "global+normalized", "sensitivity", "sensitivity+bn")
# CV of the filter norms when a layer's filters are i.i.d. Gaussian (CWDA), times sqrt(d):
# L2: ||F||_2 ~ sigma*sqrt(d) with std sigma/sqrt(2); L1: mean sigma*d*sqrt(2/pi), std sigma*sqrt(d*(1-2/pi)).
GAUSSIAN_CV_SQRT_D = {"l2": 1 / math.sqrt(2), "l1": math.sqrt(math.pi / 2 - 1)}
# Thresholds of the auto-generated comparison with paper 1 (stated in the Markdown).
NEAR_IDENTICAL_RHO = 0.9  # mean layerwise Spearman ρ at or above this = "nearly identical"
DIVERGE_RATIO = 0.10  # some group's global ratio differs by at least this between L1 and L2 = "diverge"


# -- helpers -----------------------------------------------------------------------------------------------------
def build_criterion(name: str) -> Any:
    if name == "bn_scale":
        return BNScale(fallback="l1")
    if name in ("tt", "snr", "fdr", "sd"):
        return get(name, num_classes=NUM_CLASSES)
    return get(name)


def num(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def pval(p: Any) -> str:
    if p is None:
        return "–"
    return "<1e-300" if p == 0 else format(p, ".2g")


def pair_entry(table: dict, a: str, b: str) -> dict | None:
    return table.get(f"{a}|{b}") or table.get(f"{b}|{a}")


def get_base(seed: int, splits: dict, args, cache: dict) -> tuple[torch.nn.Module, str, float]:
    """The base model of ``seed``: loaded from ``--bases`` when the file exists, else trained like criteria.py."""
    if seed in cache:
        return cache[seed]
    torch.manual_seed(seed)
    model = make_model(MODEL)
    source = None
    path = args.bases / f"{MODEL}_seed{seed}.pt" if args.bases is not None else None
    if path is not None and path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            source = f"loaded `{path}`"
        except Exception as error:  # e.g. a file still being written by criteria.py
            print(f"[seed {seed}] could not load {path} ({error}); training instead", flush=True)
            torch.manual_seed(seed)
            model = make_model(MODEL)
    t0 = time.perf_counter()
    if source is None:
        train(model, splits["train"], args.epochs, args.lr, seed)
        source = f"trained here ({args.epochs:g} epochs, {time.perf_counter() - t0:.0f} s)"
    model.eval()
    acc = accuracy(model, splits["test"])
    print(f"[seed {seed}] base {source}: test accuracy {acc:.3f}", flush=True)
    cache[seed] = (model, source, acc)
    return cache[seed]


# -- part 1: analysis --------------------------------------------------------------------------------------------
def run_analysis(base: torch.nn.Module, splits: dict, example: torch.Tensor, args) -> tuple[AnalysisReport, float]:
    criteria = [build_criterion(n) for n in args.criteria]
    loader = batches(*splits["train"], 64)
    t0 = time.perf_counter()
    graph = DependencyGraph(base, example)
    report = analyze(base, example, criteria, loader, graph=graph, target=args.analysis_target,
                     scoring_batches=args.scoring_batches, alpha=args.alpha,
                     meta={"model": MODEL, "seed": 0, "data": "sklearn digits, 32x32"})
    seconds = time.perf_counter() - t0
    # Paper 1's setting for the L1-vs-L2 global comparison: raw filter norms of single layers. Coupled groups
    # combine several producers' norms (on the same scale, but not one layer's norms), so also threshold the
    # single-producer groups alone.
    single = [g for g in graph.groups if len(g.producers) == 1]
    norms = [c for c in ("l1", "l2") if c in report.criteria]
    if single and norms:
        raw = global_ratios(single, {c: {g.name: torch.tensor(report.scores[c][g.name]) for g in single}
                                     for c in norms}, report.target)
        report.meta["raw_norm_global_ratios"] = raw
        report.meta["single_producer_groups"] = [g.name for g in single]
        report.meta["producers"] = {g.name: len(g.producers) for g in graph.groups}
    # How far training moved each conv layer from its initialization (context for CWDA: Kaiming init is i.i.d.
    # Gaussian by construction). The init is rebuilt as every base is created: torch.manual_seed(seed), make_model.
    torch.manual_seed(0)
    init = dict(make_model(MODEL).named_modules())
    moved = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd) and name in init:
            w0 = init[name].weight.detach()
            if w0.shape == module.weight.shape:
                moved[name] = float((module.weight.detach() - w0).norm() / w0.norm())
    report.meta["relative_change_from_init"] = moved
    print(f"[analysis] {len(report.criteria)} criteria, {len(report.groups)} groups, {len(report.cwda)} conv "
          f"layers in {seconds:.1f} s", flush=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    report.to_json(args.artifacts / "analysis_report.json")
    figures = report.figures(max_panels=12)
    keep = {k: figures[k] for k in ("similarity_heatmap", "qq_plots") if k in figures}
    report.save_figures(args.artifacts, figures=keep, dpi=90)
    for fig in figures.values():
        fig.clear()
    return report, seconds


def analysis_facts(report: AnalysisReport) -> dict[str, Any]:
    """The numbers the Markdown and the comparison paragraph are built from."""
    crit = report.criteria
    groups = list(report.groups)
    facts: dict[str, Any] = {"pairs": {}}
    for key, entry in report.global_similarity.items():
        taus = [report.similarity[g][key]["kendall"] for g in groups
                if report.similarity[g][key]["kendall"] is not None]
        rhos = {g: report.similarity[g][key]["spearman"] for g in groups
                if report.similarity[g][key]["spearman"] is not None}
        argmin = min(rhos, key=rhos.get) if rhos else None
        facts["pairs"][key] = dict(entry, mean_kendall=float(np.mean(taus)) if taus else None, argmin=argmin)
    # Global threshold: L1 vs L2 per-group ratios.
    if "l1" in crit and "l2" in crit:
        raw = report.meta.get("raw_norm_global_ratios", {})
        producers = report.meta.get("producers", {})
        rows = []
        for g in groups:
            r1, r2 = report.global_ratios["l1"][g], report.global_ratios["l2"][g]
            row = {"group": g, "size": report.groups[g]["size"], "d": report.groups[g]["d"],
                   "producers": producers.get(g), "l1": r1, "l2": r2, "diff": r1 - r2,
                   "mean_l1": float(np.mean(report.scores["l1"][g])),
                   "mean_l2": float(np.mean(report.scores["l2"][g]))}
            if g in raw.get("l1", {}):
                row["raw_l1"], row["raw_l2"] = raw["l1"][g], raw["l2"][g]
                row["raw_diff"] = row["raw_l1"] - row["raw_l2"]
            rows.append(row)
        facts["global"] = {"rows": rows, "layerwise": pair_entry(facts["pairs"], "l1", "l2"),
                           "all": _divergence(rows, "diff"), "raw": _divergence(rows, "raw_diff")}
    # CV of the raw filter norms vs what i.i.d. Gaussian filters give (CWDA), single-producer groups.
    cv_ratio = {}
    for c, k in GAUSSIAN_CV_SQRT_D.items():
        if c in crit:
            ratios = [report.applicability[g][c]["cv"] / (k / math.sqrt(report.groups[g]["d"]))
                      for g in report.meta.get("single_producer_groups", [])
                      if report.applicability[g][c]["cv"] is not None and report.groups[g]["d"]]
            if ratios:
                cv_ratio[c] = float(np.median(ratios))
    # Applicability.
    facts["applicability"] = {}
    for c in crit:
        cvs = [report.applicability[g][c]["cv"] for g in groups if report.applicability[g][c]["cv"] is not None]
        gaps = [report.applicability[g][c]["gap"] for g in groups if report.applicability[g][c]["gap"] is not None]
        facts["applicability"][c] = {"flagged": report.not_applicable(c),
                                     "mean_cv": float(np.mean(cvs)) if cvs else None,
                                     "min_cv": float(np.min(cvs)) if cvs else None,
                                     "mean_gap": float(np.mean(gaps)) if gaps else None,
                                     "cv_vs_gaussian": cv_ratio.get(c)}
    # CWDA.
    alpha = report.settings["alpha"]
    cw = report.cwda
    n_proj = report.settings["n_projections"]
    facts["cwda"] = {
        "layers": len(cw), "alpha": alpha,
        "reject_mean": [n for n, e in cw.items() if not e.get("zero_mean", True)],
        "reject_ks": [n for n, e in cw.items() if e.get("ks_pvalue") is not None and e["ks_pvalue"] < alpha],
        "reject_shapiro": [n for n, e in cw.items() if e.get("shapiro_min_pvalue") is not None
                           and e["shapiro_min_pvalue"] * len(e.get("shapiro_pvalues") or [1] * n_proj) < alpha],
        "reject_any": [n for n, e in cw.items() if not e.get("gaussian")],
        "diagonality": [e["diagonality"] for e in cw.values() if e.get("diagonality") is not None],
        "moved": report.meta.get("relative_change_from_init", {}),
    }
    return facts


def _divergence(rows: list[dict], key: str) -> dict[str, Any] | None:
    """Spread of the per-group L1 − L2 global ratio differences in ``rows[key]``, and its rank correlation with d."""
    rows = [r for r in rows if key in r]
    if not rows:
        return None
    from scipy import stats

    diffs = np.array([r[key] for r in rows])
    ds = np.array([r["d"] or 0 for r in rows], dtype=float)
    rho = stats.spearmanr(ds, diffs).statistic if np.ptp(ds) > 0 and np.ptp(diffs) > 0 else float("nan")
    worst = rows[int(np.argmax(np.abs(diffs)))]
    return {"groups": len(rows), "mean_abs_diff": float(np.abs(diffs).mean()),
            "max_abs_diff": float(np.abs(diffs).max()),
            "worst": worst, "worst_key": key, "rho_diff_d": float(rho)}


def comparison_paragraph(facts: dict[str, Any], crit: list[str]) -> list[str]:
    """What paper 1 reports vs what we see, computed from the numbers (thresholds stated)."""
    out = []
    weight = [c for c in WEIGHT_CRITERIA if c in crit]
    pairs = [(a, b) for i, a in enumerate(weight) for b in weight[i + 1:]]
    if pairs:
        rhos = {(a, b): pair_entry(facts["pairs"], a, b)["mean_spearman"] for a, b in pairs}
        similar = [f"{a}/{b}" for (a, b), r in rhos.items() if r is not None and r >= NEAR_IDENTICAL_RHO]
        different = [f"{a}/{b} ({r:.3f})" for (a, b), r in rhos.items() if r is not None and r < NEAR_IDENTICAL_RHO]
        text = (f"- **Layerwise similarity.** Paper 1: norm-based criteria rank a layer's filters almost identically. "
                f"Here (mean Spearman ρ over groups, \"nearly identical\" = ρ ≥ {NEAR_IDENTICAL_RHO}): ")
        text += (f"nearly identical: {len(similar)} of {len(pairs)} weight-criterion pairs"
                 + (f" ({', '.join(similar)})" if similar else ""))
        text += f"; below the threshold: {', '.join(different)}." if different else "; none is below it."
        l12 = pair_entry(facts["pairs"], "l1", "l2")
        if l12 is not None and l12["mean_spearman"] is not None:
            text += (f" L1 vs L2: mean ρ {l12['mean_spearman']:.3f}, min {l12['min_spearman']:.3f} "
                     f"(`{l12['argmin']}`), mean overlap of the pruned halves {l12['mean_topk_jaccard']:.2f}.")
        if "l1" in crit:
            data = [c for c in crit if c not in WEIGHT_CRITERIA]
            if data:
                parts = []
                for c in data:
                    e = pair_entry(facts["pairs"], "l1", c)
                    if e is not None and e["mean_spearman"] is not None:
                        parts.append(f"{c} {e['mean_spearman']:.2f}")
                if parts:
                    text += (" Data-driven criteria (not in paper 1) relate to L1 with mean ρ: " + ", ".join(parts)
                             + ".")
        out.append(text)
    g = facts.get("global")
    if g is not None:
        lay = g["layerwise"]
        text = (f"- **L1 vs L2 under global pruning.** Paper 1: nearly identical layerwise, but one global threshold "
                f"allocates different per-layer ratios (their scales grow differently with d). Here, one threshold at "
                f"{facts['target']:.0%} channel sparsity: ")
        for label, key in (("(a) over all groups as the library scores them", "all"),
                           ("(b) over the single-producer groups only (raw filter norms, paper 1's setting)", "raw")):
            dv = g[key]
            if dv is None:
                continue
            w = dv["worst"]
            prefix = "raw_" if key == "raw" else ""
            verdict = ("**diverge**, as paper 1 reports" if dv["max_abs_diff"] >= DIVERGE_RATIO
                       else "**do not diverge**, unlike paper 1")
            text += (f"{label} ({dv['groups']} groups), mean |Δratio| {dv['mean_abs_diff']:.3f}, max "
                     f"{dv['max_abs_diff']:.3f} at `{w['group']}` (d = {w['d']}: L1 {w[prefix + 'l1']:.2f} vs L2 "
                     f"{w[prefix + 'l2']:.2f}), so they {verdict}")
            if math.isfinite(dv["rho_diff_d"]):
                text += f"; Spearman ρ(d, L1 − L2 ratio) = {dv['rho_diff_d']:.2f}"
            text += "; "
        text = text.rstrip("; ") + ". "
        text += (f"Pooled over all channels ρ(L1, L2) = {lay['spearman']:.3f} vs mean layerwise "
                 f"{lay['mean_spearman']:.3f}; "
                 f"the pruned sets of the two global thresholds overlap {lay['topk_jaccard']:.2f} (Jaccard) vs "
                 f"{lay['mean_topk_jaccard']:.2f} layerwise. Paper 1's mechanism (‖F‖₁/‖F‖₂ ≈ √(2d/π)) predicts that "
                 "L1 prunes small-d layers more than L2, i.e. a negative ρ(d, L1 − L2 ratio).")
        out.append(text)
    app = facts["applicability"]
    flagged = {c: len(v["flagged"]) for c, v in app.items() if v["flagged"]}
    n_groups = facts["groups"]
    text = (f"- **Applicability.** Paper 1: in some layers a criterion's scores are too close together to separate "
            f"filters. Here (CV = std/mean < {facts['cv_threshold']:g}): ")
    text += (", ".join(f"{c} in {k}/{n_groups} groups" for c, k in flagged.items()) if flagged
             else f"no criterion is flagged in any of the {n_groups} groups")
    cvs = ", ".join(f"{c} {v['mean_cv']:.3f}" for c, v in app.items() if v["mean_cv"] is not None)
    text += f"; mean CV per criterion: {cvs}."
    gauss = ", ".join(f"{c} {v['cv_vs_gaussian']:.2f}" for c, v in app.items() if v.get("cv_vs_gaussian") is not None)
    if gauss:
        text += (f" Observed CV of the raw norms / the CV i.i.d. Gaussian filters would give (median over "
                 f"single-producer groups; ≈ 1 = the low CV is what CWDA predicts): {gauss}.")
    out.append(text)
    cw = facts["cwda"]
    if cw["layers"]:
        kept = cw["layers"] - len(cw["reject_any"])
        text = (f"- **CWDA.** Paper 1: well-trained filters of a layer are approximately i.i.d. Gaussian. Here "
                f"{kept}/{cw['layers']} conv layers are not rejected at α = {cw['alpha']:g} (KS and Bonferroni "
                f"Shapiro–Wilk on projections); KS rejects {len(cw['reject_ks'])}, Shapiro–Wilk "
                f"{len(cw['reject_shapiro'])}, the zero-mean t-test {len(cw['reject_mean'])}.")
        if cw["diagonality"]:
            text += (f" Covariance diagonality (1 = what independent coordinates give) median "
                     f"{float(np.median(cw['diagonality'])):.2f}, range {min(cw['diagonality']):.2f}–"
                     f"{max(cw['diagonality']):.2f}.")
        moved = list(cw["moved"].values())
        if moved:
            text += (" Context: training moved the conv weights from their (i.i.d. Gaussian) Kaiming initialization "
                     f"by "
                     f"a median {float(np.median(moved)):.0%} of the init's norm (range {min(moved):.0%}–"
                     f"{max(moved):.0%}; ‖W − W₀‖/‖W₀‖)")
            text += ("; below 50%, i.e. the weights are still dominated by their init, so CWDA may hold partly by "
                     "construction here." if float(np.median(moved)) < 0.5 else ".")
            if max(moved) > 1.2:
                text += " (Values above ~1.2 suggest the rebuilt init does not match this model's.)"
        out.append(text)
    return out


def analysis_markdown(report: AnalysisReport, seconds: float, base_info: str, args, md_dir: Path) -> list[str]:
    facts = analysis_facts(report)
    facts["target"] = report.target
    facts["groups"] = len(report.groups)
    facts["cv_threshold"] = report.settings["cv_threshold"]
    crit = report.criteria
    rel = Path(os.path.relpath(args.artifacts, md_dir))
    lines = [
        "## 1. Criteria analysis (paper 1)",
        "",
        f"Seed-0 base ResNet-20 ({base_info}). `lightning_prune.analysis.analyze` with criteria "
        f"{', '.join(f'`{c}`' for c in crit)}; data-driven ones score {args.scoring_batches} training batches of "
        f"64 (`bn_scale` = `BNScale(fallback=\"l1\")`, `sd` with `num_classes=10`). Pruned sets and the global "
        f"threshold are compared at {report.target:.0%} channel sparsity; {len(report.groups)} channel groups "
        f"(coupled residual groups count once), {len(report.cwda)} conv layers; {seconds:.1f} s. Report JSON: "
        f"[`{rel / 'analysis_report.json'}`]({rel / 'analysis_report.json'}).",
        "",
        f"![Per-group Spearman ρ]({rel / 'similarity_heatmap.png'})",
        "",
        "### Mean layerwise Spearman ρ (over groups)",
        "",
        "| | " + " | ".join(crit) + " |",
        "|---|" + "---:|" * len(crit),
    ]
    for a in crit:
        cells = []
        for b in crit:
            if a == b:
                cells.append("1")
            else:
                cells.append(num(pair_entry(facts["pairs"], a, b)["mean_spearman"], ".3f"))
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Per pair: spread over groups, and pooled over all channels (what one global threshold sees)",
        "",
        f"\"overlap\" = Jaccard overlap of the {report.settings['topk_fraction']:.0%} lowest-scored channels "
        "each criterion would prune (per group, mean; or pooled over all channels).",
        "",
        "| pair | mean ρ | min ρ | group of min ρ | mean τ | mean overlap | pooled ρ | pooled overlap |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key, e in facts["pairs"].items():
        lines.append(f"| {key.replace('|', ' vs ')} | {num(e['mean_spearman'])} | {num(e['min_spearman'])} | "
                     f"`{e['argmin']}` | {num(e['mean_kendall'])} | {num(e['mean_topk_jaccard'], '.2f')} | "
                     f"{num(e['spearman'])} | {num(e['topk_jaccard'], '.2f')} |")
    g = facts.get("global")
    if g is not None:
        lines += [
            "",
            f"### One global threshold at {report.target:.0%} channel sparsity: per-group pruned fraction, L1 vs L2",
            "",
            "No per-group cap (`global_max_group_sparsity=1.0`). \"all groups\": the threshold over every group's "
            "score as the library computes it; a coupled group (\"prod.\" > 1: producers across a residual add) "
            "averages its producers' mean-normalized scores and scales the result back to their average norm, "
            "while a single-producer group's scores are raw filter norms (\"mean L1/L2\" = the group's mean "
            "score). \"raw norms\": the same threshold over the single-producer groups only (paper 1's setting). "
            "Ratios of the other criteria are in the report JSON (`global_ratios`).",
            "",
            "| group | width | d | prod. | mean L1 | mean L2 | all: L1 | all: L2 | all: L1 − L2 | raw norms: L1 "
            "| raw norms: L2 | raw norms: L1 − L2 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in g["rows"]:
            raw = (f"{r['raw_l1']:.2f} | {r['raw_l2']:.2f} | {r['raw_diff']:+.2f}" if "raw_diff" in r
                   else "– | – | –")
            lines.append(f"| `{r['group']}` | {r['size']} | {r['d']} | {r['producers'] or '–'} | "
                         f"{r['mean_l1']:.3g} | "
                         f"{r['mean_l2']:.3g} | {r['l1']:.2f} | {r['l2']:.2f} | {r['diff']:+.2f} | {raw} |")
    lines += [
        "",
        f"### Applicability (CV = std/mean of the scores; flagged when CV < {report.settings['cv_threshold']:g})",
        "",
        "\"CV / Gaussian\": median over single-producer groups of the observed CV divided by the CV of the norms of "
        "i.i.d. Gaussian filters (L2: 1/√(2d); L1: √(π/2 − 1)/√d); ≈ 1 means the low CV is just what CWDA "
        "predicts. Gap = (mean kept − mean pruned score) / mean score at the target.",
        "",
        "| criterion | groups flagged | mean CV | min CV | CV / Gaussian | mean gap | flagged groups |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c, a in facts["applicability"].items():
        flagged = a["flagged"]
        names = ("all" if flagged and len(flagged) == len(report.groups)
                 else ", ".join(f"`{x}`" for x in flagged) or "–")
        lines.append(f"| {c} | {len(flagged)}/{len(report.groups)} | {num(a['mean_cv'])} | {num(a['min_cv'])} | "
                     f"{num(a['cv_vs_gaussian'], '.2f')} | {num(a['mean_gap'])} | {names} |")
    cw = facts["cwda"]
    if report.cwda:
        s = report.settings
        lines += [
            "",
            f"### CWDA (per conv layer; α = {s['alpha']:g})",
            "",
            f"t-test of the weights against mean 0; diagonality = off-diagonal/diagonal Frobenius ratio of the d×d "
            f"filter covariance divided by its value under independence (≈ 1 = diagonal); Shapiro–Wilk on "
            f"{s['n_projections']} random 1-D projections of the filters (min p, Bonferroni ×{s['n_projections']}); "
            f"KS of at most {s['max_samples']} standardized weights against N(0,1). \"Gaussian\" = KS and "
            f"Bonferroni Shapiro–Wilk both not rejected. \"moved\" = ‖W − W₀‖/‖W₀‖, the relative distance of "
            f"the trained weights from their initialization W₀ (rebuilt from the seed).",
            "",
            f"Layers rejecting at α = {s['alpha']:g}: **{len(cw['reject_any'])}/{cw['layers']}** overall; KS "
            f"{len(cw['reject_ks'])}, Shapiro–Wilk {len(cw['reject_shapiro'])}, zero mean {len(cw['reject_mean'])}.",
            "",
            f"![QQ plots]({rel / 'qq_plots.png'})",
            "",
            "| layer | n | d | moved | mean p | diagonality | Shapiro min p | KS p | Gaussian |",
            "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for name, e in report.cwda.items():
            moved = cw["moved"].get(name)
            lines.append(f"| `{name}` | {e['n']} | {e['d']} | {'–' if moved is None else f'{moved:.0%}'} | "
                         f"{pval(e.get('mean_pvalue'))} | "
                         f"{num(e.get('diagonality'), '.2f')} | {pval(e.get('shapiro_min_pvalue'))} | "
                         f"{pval(e.get('ks_pvalue'))} | {'yes' if e.get('gaussian') else 'no'} |")
    lines += ["", "### What paper 1 reports vs what we see", "",
              "Generated from the numbers above (thresholds: nearly identical = mean ρ ≥ "
              f"{NEAR_IDENTICAL_RHO}; diverge = some group's global ratio differs by ≥ {DIVERGE_RATIO}).", ""]
    lines += comparison_paragraph(facts, crit)
    lines.append("")
    return lines


# -- part 2: allocation comparison -------------------------------------------------------------------------------
def prune_one(base, example, splits, allocation: str, args, seed: int) -> dict[str, Any]:
    model = copy.deepcopy(base).eval()
    flops_before, params_before = count_flops(model, example), count_params(model)
    kwargs: dict[str, Any] = {}
    if allocation.startswith("sensitivity"):
        kwargs["val_dataloader"] = batches(*splits["val"], 256)  # held-out split of the training data
        kwargs["sensitivity"] = {"prune_multiple": args.prune_multiple, "num_groups": args.num_groups,
                                 "min_width_fraction": args.min_width_fraction, "progress": False}
        if allocation.endswith("+bn"):
            kwargs["sensitivity"]["recalibrate_batches"] = 4
            kwargs["dataloader"] = batches(*splits["train"], 64)
    t0 = time.perf_counter()
    criterion = "l1+normalized" if allocation == "global+normalized" else "l1"
    report = prune(model, example, criterion=criterion, flops_reduction=args.flops_reduction,
                   allocation=allocation.split("+")[0], **kwargs)
    seconds = time.perf_counter() - t0
    flops_after = count_flops(model, example)
    result = {
        "allocation": allocation, "seed": seed, "seconds": seconds,
        "flops_reduction": 1.0 - flops_after / flops_before,
        "params_reduction": 1.0 - count_params(model) / params_before,
        "channel_sparsity": report.channel_sparsity, "target_met": report.target_met,
        "rounds": len(report.plan.get("events", [])), "widths": report.widths_after,
        "original_widths": report.original_widths,
    }
    result["pruned"] = accuracy(model, splits["test"])
    recalibrated = copy.deepcopy(model)
    recalibrate_batchnorm(recalibrated, batches(*splits["train"], 64), num_batches=8)
    result["pruned_bn"] = accuracy(recalibrated, splits["test"])
    train(model, splits["train"], args.finetune_epochs, args.finetune_lr, seed + 1000)
    result["tuned"] = accuracy(model, splits["test"])
    print(f"  {allocation:<12} FLOPs -{result['flops_reduction']:.1%} (params -{result['params_reduction']:.1%}, "
          f"{result['rounds']} surgeries) pruned {result['pruned']:.3f} (BN re-estimated {result['pruned_bn']:.3f}) tuned {result['tuned']:.3f} "
          f"alloc {seconds:.1f} s", flush=True)
    return result


def allocation_markdown(results: list[dict], bases: dict, args) -> list[str]:
    seeds = sorted({r["seed"] for r in results})
    base_acc = [bases[s][2] for s in seeds]
    sens = (f"`prune_multiple={args.prune_multiple:g}`, `num_groups={args.num_groups}`, "
            f"`min_width_fraction={args.min_width_fraction:g}`")
    lines = [
        "## 2. Allocation at the same FLOPs reduction (paper 2)",
        "",
        f"Seeds {seeds}; base test accuracy {fmt(base_acc)}%. Each base is pruned in one call "
        f"`lightning_prune.prune(model, example, criterion=\"l1\", flops_reduction={args.flops_reduction:g}, "
        f"allocation=...)` (default `max_group_sparsity=0.9`), then fine-tuned {args.finetune_epochs:g} epochs "
        f"(Adam {args.finetune_lr:g}, cosine, same `train` as criteria.py) and evaluated on the 360-image test "
        f"split (mean ± std over seeds, in %). Sensitivity ({sens}, {args.threads} CPU thread(s)) measures the "
        f"accuracy of each trial on the {len(load_digits_splits()['val'][1])}-image validation split (held out "
        "from the training data, never the test split), re-scores L1 after every round, and — unlike the paper — "
        "does not retrain between rounds; \"sensitivity+bn\" re-estimates BatchNorm statistics on 4 training "
        "batches before the baseline and every trial (`sensitivity={\"recalibrate_batches\": 4}`). Global "
        "allocation thresholds the group scores as the library computes them (raw L1 norms for single-producer "
        "groups; for the coupled residual groups the producers' mean-normalized norms averaged and scaled back "
        "to their average norm; see part 1). \"pruned acc\" is measured right after pruning; \"+BN\" after "
        "re-estimating BatchNorm statistics on 8 training batches (on a copy: fine-tuning starts from the "
        "pruned model as it is). \"alloc s\" = wall time of the `prune` call (scoring, allocation, surgery); "
        "\"surgeries\" = pruning rounds.",
        "",
        "| allocation | FLOPs reduction (fvcore) | params removed | channels removed | pruned acc | pruned acc +BN | "
        "tuned acc | alloc s | surgeries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for alloc in ALLOCATIONS:
        rs = [r for r in results if r["allocation"] == alloc]
        if not rs:
            continue
        lines.append(
            f"| {alloc} | {fmt([r['flops_reduction'] for r in rs])}% | {fmt([r['params_reduction'] for r in rs])}% | "
            f"{fmt([r['channel_sparsity'] for r in rs])}% | {fmt([r['pruned'] for r in rs])} | "
            f"{fmt([r['pruned_bn'] for r in rs])} | {fmt([r['tuned'] for r in rs])} | {statistics.fmean(r['seconds'] for r in rs):.1f} | "
            f"{statistics.fmean(r['rounds'] for r in rs):.0f} |")
    first = seeds[0]
    by_alloc = {r["allocation"]: r for r in results if r["seed"] == first}
    if by_alloc:
        shown = [a for a in ALLOCATIONS if a in by_alloc]
        original = next(iter(by_alloc.values()))["original_widths"]
        lines += [
            "",
            f"Final widths per channel group, seed {first} (original width in parentheses):",
            "",
            "| group | " + " | ".join(shown) + " |",
            "|---|" + "---:|" * len(shown),
        ]
        for g, w in original.items():
            lines.append(f"| `{g}` ({w}) | " + " | ".join(str(by_alloc[a]["widths"].get(g, w)) for a in shown) + " |")
    lines.append("")
    return lines


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1-epoch base, tiny fine-tune")
    parser.add_argument("--parts", nargs="+", default=["analysis", "allocation"], choices=["analysis", "allocation"])
    parser.add_argument("--bases", type=Path, default=None,
                        help="directory with resnet20_seed<seed>.pt state dicts (criteria.py --save-base)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--criteria", nargs="+", default=None, help=f"analysis criteria (default {ALL_CRITERIA})")
    parser.add_argument("--analysis-target", type=float, default=0.5, help="channel sparsity of the comparisons")
    parser.add_argument("--alpha", type=float, default=0.01, help="CWDA significance level")
    parser.add_argument("--scoring-batches", type=int, default=None, help="training batches of 64 (data criteria)")
    parser.add_argument("--flops-reduction", type=float, default=0.5)
    parser.add_argument("--epochs", type=float, default=None, help="base training epochs when not loaded")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-epochs", type=float, default=None)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--prune-multiple", type=float, default=None, help="sensitivity m (paper: 0.8)")
    parser.add_argument("--num-groups", type=int, default=None,
                        help="sensitivity groups pruned per round (paper: 1; default 2 to halve the rounds)")
    parser.add_argument("--min-width-fraction", type=float, default=0.125)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    parser.add_argument("--out", type=Path, default=None, help="Markdown file")
    parser.add_argument("--artifacts", type=Path, default=None, help="directory for JSON and PNG files")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.criteria = args.criteria or (QUICK_CRITERIA if quick else ALL_CRITERIA)
    args.epochs = args.epochs if args.epochs is not None else (1.0 if quick else 20.0)
    args.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (0.25 if quick else 3.0)
    args.scoring_batches = args.scoring_batches or (2 if quick else 8)
    args.prune_multiple = args.prune_multiple if args.prune_multiple is not None else (2.0 if quick else 0.8)
    args.num_groups = args.num_groups or 2
    tmp = Path(tempfile.gettempdir())
    if args.out is None:
        args.out = tmp / "analysis-quick.md" if quick else ROOT / "docs" / "benchmarks" / "analysis.md"
    if args.artifacts is None:
        args.artifacts = args.out.parent / args.out.stem
    torch.set_num_threads(max(1, args.threads))

    wall = time.perf_counter()
    splits_raw = load_digits_splits()
    splits = {k: (resize(x, IMAGE_SIZE), y) for k, (x, y) in splits_raw.items()}
    example = splits["train"][0][:2]
    command = "python benchmarks/analysis.py" + (" --quick" if quick else "") + (
        f" --bases {args.bases}" if args.bases is not None else "")
    header = [
        "# Criteria analysis and sensitivity allocation on scikit-learn digits",
        "",
        f"Generated by `{command}` ({args.threads} CPU thread(s)). CIFAR ResNet-20 "
        f"({count_flops(make_model(MODEL).eval(), example) / 1e6:.2f} MFLOPs at 32×32) trained on the digits "
        "upscaled to 32×32, as in [criteria.md](criteria.md): base training "
        f"{args.epochs:g} epochs (Adam {args.lr:g}, cosine) unless loaded from criteria.py's saved bases.",
        "",
    ]
    sections: dict[str, list[str]] = {}

    def write() -> str:
        text = "\n".join(header + sections.get("analysis", []) + sections.get("allocation", [])
                         + sections.get("footer", [])) + "\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return text

    bases: dict[int, tuple] = {}
    md_dir = args.out.parent
    if "analysis" in args.parts:
        base, source, acc = get_base(0, splits, args, bases)
        report, seconds = run_analysis(base, splits, example, args)
        print(report.summary(), flush=True)
        sections["analysis"] = analysis_markdown(report, seconds, f"{source}; test accuracy {acc:.1%}", args, md_dir)
        write()
    if "allocation" in args.parts:
        results: list[dict] = []
        for seed in args.seeds:
            base, _, _ = get_base(seed, splits, args, bases)
            for allocation in args.allocations:
                results.append(prune_one(base, example, splits, allocation, args, seed))
            sections["allocation"] = allocation_markdown(results, bases, args)
            args.artifacts.mkdir(parents=True, exist_ok=True)
            (args.artifacts / "allocation.json").write_text(json.dumps(
                {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "bases": {str(s): {"source": b[1], "test_accuracy": b[2]} for s, b in bases.items()},
                 "results": results}, indent=1))
            write()  # partial results survive an interrupted run
    sources = "; ".join(f"seed {s}: {b[1]}" for s, b in sorted(bases.items()))
    sections["footer"] = [f"Base models: {sources}. Total wall time {time.perf_counter() - wall:.0f} s.", ""]
    text = write()
    print()
    print(text)
    print(f"written to {args.out} (JSON/PNG in {args.artifacts})")
    return text


if __name__ == "__main__":
    main()
