"""Latency targets (issue 13): does ``latency_reduction=r`` deliver a measured latency ratio <= 1 - r, and what
does ``flops_reduction=r`` (the proxy) deliver?

For each model (torchvision ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``vgg16_bn`` at 224x224 batch 8; the
CIFAR ``resnet56`` at 32x32 batch 64; random weights with a fixed seed, eval mode) and each target ``r``:

* **latency**: a copy pruned with ``prune(model, x[:2], "l2", latency_reduction=r, latency_input=x)``;
* **flops**: a copy pruned with ``prune(model, x[:2], "l2", flops_reduction=r)`` (uniform allocation).

The latency ratio of a variant is measured by *interleaving* it with the dense model (``interleaved_times``: dense,
variant, variant, dense, ...), so a shared machine's changing load falls on both alike, over ``--placements``
blocks of rounds, each block after the first on fresh copies of both models (on CPU a model's speed depends on
where its weights lie in memory), and extended by ``--rounds`` more until the ratio's standard error is 1 % of
it or ``--max-rounds`` are spent. The ratio is the median of the per-round ratios; its standard error and the
spread of the per-placement ratios are reported beside it. The page faults of one warm forward pass of the dense
model and of the latency variant are reported too: a model whose passes map fresh memory measures differently
with the allocator's state; run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` to rule that out
(the allocator settings are printed with the machine).
Goal: measured ratio <= (1 - r) x 1.05 for the latency target in every case. Also reported: the latency table's
build time and the number of distinct layer timings (a machine-independent count), the event's wall time, the
table's prediction error at the pruned widths, and the FLOPs ratio each variant reaches.

Usage::

    python benchmarks/latency_target.py                          # all models, targets 0.3 and 0.5
    python benchmarks/latency_target.py --models resnet56 --targets 0.5 --rounds 10
    python benchmarks/latency_target.py --batch 2                # big models at a smaller batch
    python benchmarks/latency_target.py --round-to auto          # the latency variant on the measured steps

Writes Markdown to ``docs/benchmarks/latency_target.md`` (rows are appended as they finish).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LATENCY_MODELS, machine_description, write_results  # noqa: E402
from lightning_prune.models import create_model  # noqa: E402
from lightning_prune.pruning import prune  # noqa: E402
from lightning_prune.structure import DependencyGraph, count_flops  # noqa: E402
from lightning_prune.structure.latency import LatencyModel, page_faults_per_forward, time_pair  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "latency_target.md"
MODELS = LATENCY_MODELS
TOLERANCE = 0.05


def build(name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=classes).eval()


def measured(dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, rounds: int, placements: int,
             max_rounds: int) -> dict:
    """Dense ms, the pooled per-round ratio, its standard error, the rounds and the per-placement ratios."""
    timing = time_pair(dense, model, x, rounds=rounds, placements=placements, precision=0.01, max_rounds=max_rounds)
    per_placement = timing.placement_ratios()
    return {"dense_ms": statistics.median(timing.first), "ratio": timing.ratio, "se": timing.standard_error,
            "rounds": timing.rounds, "spread": (min(per_placement), max(per_placement))}


def run_case(name: str, dense: torch.nn.Module, x: torch.Tensor, target: float, rounds: int, cache: str,
             round_to: int | str | None = None, placements: int = 1, max_rounds: int = 0) -> dict:
    row = {"model": name, "batch": x.shape[0], "target": target}
    dense_flops = count_flops(dense, x[:1])
    latency_model = copy.deepcopy(dense)
    start = time.perf_counter()
    report = prune(latency_model, x[:2], "l2", latency_reduction=target, latency_input=x, latency_cache=cache,
                   round_to=round_to)
    row["event_s"] = time.perf_counter() - start
    # Re-measured at once, before anything else runs in the process: separates an error of the event's own
    # measurement from a drift between the event and the final measurement below.
    row["right_after"] = measured(dense, latency_model, x, rounds, placements, rounds)["ratio"]
    last = report.latency_steps[-1] if report.latency_steps else {}
    row["event_se"], row["event_rounds"] = last.get("standard_error", float("nan")), last.get("rounds", 0)
    flops_model = copy.deepcopy(dense)
    prune(flops_model, x[:2], "l2", flops_reduction=target)
    for label, model in (("latency", latency_model), ("flops", flops_model)):
        m = measured(dense, model, x, rounds, placements, max_rounds)
        dense_ms, row[f"{label}_ratio"], row[f"{label}_spread"] = m["dense_ms"], m["ratio"], m["spread"]
        row[f"{label}_se"], row[f"{label}_rounds"] = m["se"], m["rounds"]
        row[f"{label}_flops_ratio"] = count_flops(model, x[:1]) / dense_flops
    row["dense_ms"] = dense_ms
    row["faults"] = (page_faults_per_forward(dense, x), page_faults_per_forward(latency_model, x))
    row["predicted_ratio"] = report.predicted_latency_ms / report.dense_latency_ms
    row["event_ratio"] = report.latency_ratio
    row["event_steps"] = len(report.latency_steps)  # plan + corrections (+ steps taken back), each measured
    row["taken_back"] = sum(s["kind"] == "taken back" for s in report.latency_steps)
    row["met"] = row["latency_ratio"] <= (1 - target) * (1 + TOLERANCE)
    return row


def render(rows: list[dict], tables: dict, args: argparse.Namespace, started: str, machine: list[str]) -> str:
    lines = [f"# Latency targets (CPU, {args.threads} thread)", "", f"Started {started} UTC. `python "
             f"benchmarks/latency_target.py {' '.join(sys.argv[1:])}`", "", *machine, "",
             "Ratios are pruned / dense latency, measured interleaved with the dense model (median of "
             f"{args.rounds}-{args.max_rounds} per-round ratios, {args.placements} memory placements per {args.rounds} "
             "rounds, extended until the standard error is 1 % of the ratio; 'per placement' is the range of the "
             "placements' own ratios); goal: latency ratio <= (1 - target) x 1.05.", "",
             "| model | batch | target | goal ratio | **latency target: measured ratio** | +- (rounds) | "
             "per placement | "
             "met | "
             "its FLOPs ratio | "
             "table predicted | event's own measurement (rounds) | re-measured right after the event | "
             "flops_reduction target: latency ratio | its FLOPs ratio | "
             "dense ms | event s | event steps (taken back) | page faults per pass: dense, latency variant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['target']:.1f} | {1 - r['target']:.3f} | "
                     f"**{r['latency_ratio']:.3f}** | {r['latency_se']:.3f} ({r['latency_rounds']}) | "
                     f"{r['latency_spread'][0]:.3f}-{r['latency_spread'][1]:.3f} | "
                     f"{'yes' if r['met'] else 'NO'} | {r['latency_flops_ratio']:.3f} | "
                     f"{r['predicted_ratio']:.3f} | "
                     f"{r['event_ratio']:.3f} +- {r['event_se']:.3f} ({r['event_rounds']}) | "
                     f"{r['right_after']:.3f} | {r['flops_ratio']:.3f} | "
                     f"{r['flops_flops_ratio']:.3f} | {r['dense_ms']:.1f} | {r['event_s']:.1f} | "
                     f"{r.get('event_steps', '')} ({r.get('taken_back', 0)}) | {_faults(r.get('faults'))} |")
    lines += ["", "Latency tables (built once per model, then read from the cache):", "",
              "| model | layers in table | distinct layer timings (incl. round_to probes) | build s |", "|---|---|---|---|"]
    for name, t in tables.items():
        lines.append(f"| {name} | {t['layers']} | {t['timings']} | {t['build_s']:.1f} |")
    import os

    lines += ["", f"Load average at the last row ({datetime.datetime.utcnow():%H:%M} UTC): "
              + ", ".join(f"{v:.2f}" for v in os.getloadavg())]
    return "\n".join(lines) + "\n"


def _faults(faults: tuple | None) -> str:
    return ", ".join("-" if f is None else f"{f:,.0f}" for f in faults) if faults else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--rounds", type=int, default=36)
    parser.add_argument("--batch", type=int, default=None, help="override the batch of the 224x224 models")
    parser.add_argument("--placements", type=int, default=6,
                        help="memory placements (fresh copies of both models) the rounds are spread over")
    parser.add_argument("--max-rounds", dest="max_rounds", type=int, default=144)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--round-to", dest="round_to", default=None,
                        help="round_to of the latency-target variant: an integer or 'auto' (default None)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.round_to not in (None, "auto"):
        args.round_to = int(args.round_to)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
    machine = machine_description(args.threads)
    cache = tempfile.mkdtemp(prefix="latency-cache-")
    rows, tables = [], {}
    for name in args.models:
        size, batch, classes = MODELS[name]
        if args.batch and size == 224:
            batch = args.batch
        dense = build(name, classes)
        x = torch.randn(batch, 3, size, size)
        table = LatencyModel.build(DependencyGraph(dense, x[:2]), x, cache_dir=cache)
        tables[name] = {"layers": len(table.entries), "timings": table.timings, "build_s": table.build_s}
        for target in args.targets:
            t0 = time.perf_counter()
            rows.append(run_case(name, dense, x, target, args.rounds, cache, args.round_to, args.placements,
                                  args.max_rounds))
            print(f"[{name} {target}] {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_results(Path(args.out), render(rows, tables, args, started, machine))
    print(render(rows, tables, args, started, machine))


if __name__ == "__main__":
    main()
