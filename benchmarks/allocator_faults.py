"""Why CPU latency ratios move between processes (issue 13): page faults per forward pass under the memory
allocator's settings.

A dense model and a copy pruned with ``prune(model, x[:2], "l2", amount=--amount)`` (``mobilenet_v2`` at 224x224
batch 8 by default, random weights, seed 0, eval mode, one thread) are timed in *separate child processes*, one
per allocator setting and repeat: each child times ``--rounds`` interleaved rounds of (dense, pruned) after 2
warm-up passes (``structure.latency.interleaved_times``), then counts the minor page faults of a warm pass of each
model (``structure.latency.page_faults_per_forward``: the median of 3 after 3 warm-up passes). Reported per
setting: the median and range over the children of the dense model's median ms, the pruned one's, their per-round
ratio (median) and the faults per pass. Settings (environment of the child):

* ``default``: the C library's malloc as it comes;
* ``keep``: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` (glibc serves large blocks from the heap and
  keeps freed memory for reuse: what the latency warning recommends);
* ``mmap128k``: ``MALLOC_MMAP_THRESHOLD_=131072`` (every block above 128 KiB mapped anew: the worst case);
* ``jemalloc``: ``LD_PRELOAD`` of libjemalloc, default configuration, when installed.

Usage::

    python benchmarks/allocator_faults.py                       # mobilenet_v2, 4 children per setting
    python benchmarks/allocator_faults.py --model resnet56 --repeats 2

Writes Markdown to ``docs/benchmarks/allocator_faults.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LATENCY_MODELS, machine_description, write_results  # noqa: E402

from lightning_prune.structure.latency import KEEP_FREED_MEMORY  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "allocator_faults.md"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SETTINGS = {
    "default": {},
    "keep": KEEP_FREED_MEMORY,
    "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "jemalloc": {"LD_PRELOAD": JEMALLOC},
}


def child(model_name: str, amount: float, rounds: int) -> dict:
    """One process's measurement (run with ``--child``): JSON on stdout."""
    import torch

    from lightning_prune.models import create_model
    from lightning_prune.pruning import prune
    from lightning_prune.structure.latency import interleaved_times, page_faults_per_forward, pair_ratio

    torch.set_num_threads(1)
    size, batch, classes = LATENCY_MODELS[model_name]
    torch.manual_seed(0)
    dense = create_model(model_name, num_classes=classes).eval()
    x = torch.randn(batch, 3, size, size)
    pruned = create_model(model_name, num_classes=classes).eval()
    pruned.load_state_dict(dense.state_dict())
    prune(pruned, x[:2], "l2", amount=amount)
    times = interleaved_times(dense, pruned, x, warmup=2, rounds=rounds)
    return {"dense_ms": statistics.median(times[0]), "pruned_ms": statistics.median(times[1]),
            "ratio": pair_ratio(times), "dense_faults": page_faults_per_forward(dense, x),
            "pruned_faults": page_faults_per_forward(pruned, x)}


def run_setting(env: dict, args: argparse.Namespace) -> list[dict]:
    results = []
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--amount",
                               str(args.amount), "--rounds", str(args.rounds)],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def render(rows: dict, args: argparse.Namespace, started: str, machine: list[str]) -> str:
    lines = [f"# Page faults and CPU latency under the allocator's settings ({args.model})", "",
             f"Started {started} UTC. `python benchmarks/allocator_faults.py {' '.join(sys.argv[1:])}`", "",
             *machine, "",
             f"{args.repeats} child processes per setting, one after the other; each times {args.rounds} interleaved "
             f"rounds of the dense model and a copy pruned with amount={args.amount} (l2) after 2 warm-up passes, "
             "then counts the page faults of a warm pass of each (median of 3 after 3 warm-up passes). Cells: median "
             "over the children (range).", "",
             "| setting | environment | dense ms | pruned ms | pruned / dense (median per-round ratio) | "
             "page faults per pass: dense | pruned |", "|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        env = ", ".join(f"`{k}={v}`" for k, v in SETTINGS[name].items()) or "-"
        lines.append(f"| {name} | {env} | {spread([r['dense_ms'] for r in results], '.1f')} | "
                     f"{spread([r['pruned_ms'] for r in results], '.1f')} | "
                     f"{spread([r['ratio'] for r in results], '.3f')} | "
                     f"{spread([r['dense_faults'] for r in results], ',.0f')} | "
                     f"{spread([r['pruned_faults'] for r in results], ',.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2", choices=list(LATENCY_MODELS))
    parser.add_argument("--amount", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.amount, args.rounds)))
        return
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
    machine = machine_description(1)
    rows = {}
    for name in args.settings:
        if name == "jemalloc" and not Path(JEMALLOC).exists():
            print(f"[{name}] skipped: {JEMALLOC} is not installed", flush=True)
            continue
        rows[name] = run_setting(SETTINGS[name], args)
        print(f"[{name}] {rows[name]}", flush=True)
        write_results(Path(args.out), render(rows, args, started, machine))
    print(render(rows, args, started, machine))


if __name__ == "__main__":
    main()
