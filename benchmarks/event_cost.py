"""Cost of one one-shot prune event, lightning-prune vs Torch-Pruning 1.6.1.

For each (library, model) pair, in its own subprocess with ``torch.set_num_threads(1)``:

* **ours**: ``lp.prune(m, x, criterion="l2", amount=0.5)``;
* **tp**: ``tp.pruner.MetaPruner(m, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[classifier]).step()``.

The graph build is included on both sides (it is part of the event); imports are not (both libraries are
imported before the clock starts). Measured:

* ``seconds``: wall time of the whole event (``time.perf_counter`` around the call above);
* ``peak_mb``: peak resident-memory increase during the event, ``ru_maxrss`` after minus ``ru_maxrss`` just
  before (the model and the input already exist; ``gc.collect()`` first). Same definition for both libraries;
* machine-independent counts: ``forwards`` (calls of the model's own ``forward``, from a forward pre-hook on the
  top module: every forward of the whole network, the tracing ones and fvcore's included), ``fvcore_counts``
  (``FlopCountAnalysis`` instances created) and ``graph_builds`` (``tp.DependencyGraph.build_dependency`` calls).

The 2-core machine is shared, so runs are interleaved (ours, tp, ours, tp...) and the median of ``--repeats``
runs is reported, with the ratio ours/tp of the medians.

Usage::

    python benchmarks/event_cost.py --models resnet18,resnet50 --repeats 3 --label after
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODELS = "resnet18,resnet34,resnet50,resnet101,resnet152,efficientnet_b0,densenet121,densenet201"
DEFAULT_JSON = "docs/benchmarks/event_cost.json"


# ====================================================================================================================
# Worker side: one (library, model) per process.
# ====================================================================================================================
def _classifier(model: Any) -> Any:
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _worker(tool: str, name: str, size: int) -> dict[str, Any]:
    import gc
    import resource

    import torch
    import torch_pruning as tp
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    x = torch.randn(1, 3, size, size)

    counts = {"forwards": 0, "fvcore_counts": 0, "graph_builds": 0}

    def count_forward(module: Any, args: Any) -> None:
        counts["forwards"] += 1

    model.register_forward_pre_hook(count_forward)
    original_build = tp.DependencyGraph.build_dependency

    def counted_build(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["graph_builds"] += 1
        return original_build(self, *args, **kwargs)

    tp.DependencyGraph.build_dependency = counted_build
    import fvcore.nn

    original_fca = fvcore.nn.FlopCountAnalysis

    class CountedFCA(original_fca):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            counts["fvcore_counts"] += 1
            super().__init__(*args, **kwargs)

    fvcore.nn.FlopCountAnalysis = CountedFCA

    if tool == "ours":
        # Imports happen before timing on both sides (Torch-Pruning imports everything with the package; ours
        # imports the pruning and criteria layers on first use, ~45 ms).
        import lightning_prune.criteria.builtin  # noqa: F401
        from lightning_prune import prune

        def event() -> Any:
            return prune(model, x, criterion="l2", amount=0.5)
    else:
        def event() -> Any:
            pruner = tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                          ignored_layers=[_classifier(model)])
            pruner.step()

    params_before = sum(p.numel() for p in model.parameters())
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    event()
    seconds = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    params_after = sum(p.numel() for p in model.parameters())
    return {"tool": tool, "model": name, "seconds": seconds, "peak_mb": peak_mb, **counts,
            "params_kept": params_after / params_before}


def _run_one(tool: str, name: str, size: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", tool, "--models", name, "--size", str(size)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "model": name, "error": f"timeout after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"tool": tool, "model": name, "error": (done.stderr or done.stdout)[-800:]}


# ====================================================================================================================
# Driver side.
# ====================================================================================================================
def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    summary = {}
    for name in models:
        row: dict[str, Any] = {}
        for tool in ("ours", "tp"):
            mine = [r for r in runs if r["model"] == name and r["tool"] == tool and "error" not in r]
            errors = [r["error"] for r in runs if r["model"] == name and r["tool"] == tool and "error" in r]
            row[tool] = {key: _median(mine, key) for key in
                         ("seconds", "peak_mb", "forwards", "fvcore_counts", "graph_builds", "params_kept")}
            row[tool]["runs"] = len(mine)
            if errors:
                row[tool]["errors"] = errors
        if row["ours"]["seconds"] and row["tp"]["seconds"]:
            row["time_ratio"] = row["ours"]["seconds"] / row["tp"]["seconds"]
        if row["ours"]["peak_mb"] is not None and row["tp"]["peak_mb"]:
            row["memory_ratio"] = row["ours"]["peak_mb"] / row["tp"]["peak_mb"]
        summary[name] = row
    return summary


def markdown(data: dict[str, Any]) -> str:
    """The before/after tables of ``event_cost.json``."""
    lines = ["# Prune-event cost vs Torch-Pruning 1.6.1", "",
             "Generated by `python benchmarks/event_cost.py` (see its docstring for the definitions). Medians of the "
             "interleaved runs; ratio = ours / Torch-Pruning.", ""]
    for label, run in data.items():
        lines += [f"## {label} ({run['date']}, {run['size']}x{run['size']}, {run['repeats']} runs each)", "",
                  *run["machine"], "",
                  "| model | ours s | TP s | **time ratio** | ours peak MB | TP peak MB | **memory ratio** | "
                  "forwards ours/TP | fvcore counts | graph builds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in run["summary"].items():
            ours, tp = row["ours"], row["tp"]
            if not ours["seconds"] or not tp["seconds"]:
                lines.append(f"| {name} | failed: {ours.get('errors') or tp.get('errors')} |")
                continue
            lines.append(f"| {name} | {ours['seconds']:.2f} | {tp['seconds']:.2f} | **{row['time_ratio']:.2f}x** | "
                         f"{ours['peak_mb']:.0f} | {tp['peak_mb']:.0f} | **{row['memory_ratio']:.2f}x** | "
                         f"{ours['forwards']:.0f} / {tp['forwards']:.0f} | {ours['fvcore_counts']:.0f} | "
                         f"{ours['graph_builds']:.0f} / {tp['graph_builds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--label", default="after", help="key under which results are stored (before/after)")
    parser.add_argument("--json", default=DEFAULT_JSON)
    parser.add_argument("--markdown", default="docs/benchmarks/event_cost.md", help="tables written from --json")
    parser.add_argument("--worker", choices=("ours", "tp"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.models, args.size)), flush=True)
        return

    models = [m for m in args.models.split(",") if m]
    runs: list[dict[str, Any]] = []
    for name in models:
        for repeat in range(args.repeats):
            for tool in (("ours", "tp") if repeat % 2 == 0 else ("tp", "ours")):  # interleaved against load drift
                result = _run_one(tool, name, args.size, args.timeout)
                runs.append(result)
                print(json.dumps(result), flush=True)

    from _common import machine_description

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.label] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(1), "size": args.size, "repeats": args.repeats,
        "summary": {**data.get(args.label, {}).get("summary", {}), **summarize(runs, models)},
        "runs": data.get(args.label, {}).get("runs", []) + runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    Path(args.markdown).write_text(markdown(data))
    for name, row in data[args.label]["summary"].items():
        print(f"{name}: time {row.get('time_ratio', float('nan')):.2f}x  memory {row.get('memory_ratio', float('nan')):.2f}x  "
              f"ours {row['ours']}  tp {row['tp']}")


if __name__ == "__main__":
    main()
