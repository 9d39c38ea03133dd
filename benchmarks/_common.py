"""Helpers shared by the benchmark scripts: the machine description every results file starts with, and
writing a results file (also mid-run, so an interrupted run keeps what it measured)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: int | None) -> list[str]:
    """Markdown bullet lines: platform, CPU, threads, load average and library versions."""
    import fvcore
    import pytorch_lightning as pl
    import torch
    import torch_pruning
    import torchvision

    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    threads_text = f"torch intra-op threads: {threads} (`torch.set_num_threads`)" if threads else "default threads"
    return [
        f"- Platform: `{platform.platform()}`, Python {platform.python_version()}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores visible, no GPU; {threads_text}; load average at "
        f"start: {load}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, pytorch-lightning {pl.__version__}, "
        f"torch_pruning {getattr(torch_pruning, '__version__', '?')}, fvcore {getattr(fvcore, '__version__', '?')}",
        f"- Memory allocator: {allocator_description()}",
    ]


#: the latency benchmarks' models: (input side, batch, classes)
LATENCY_MODELS = {"resnet56": (32, 64, 10), "resnet18": (224, 8, 1000), "mobilenet_v2": (224, 8, 1000),
                  "resnet50": (224, 8, 1000), "vgg16_bn": (224, 8, 1000)}


def allocator_description() -> str:
    """glibc malloc's tunables and a preloaded allocator, as set in the environment (they change CPU latency)."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    return ", ".join(f"`{s}`" for s in settings) if settings else "the C library's default (no MALLOC_* settings)"


def write_results(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
