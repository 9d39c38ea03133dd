"""Issue 15: one-shot prune of timm models with ghost blocks, selective kernels and split/concat patterns.

Each model runs in its own process (``python benchmarks/timm_patterns.py MODEL``): ``timm.create_model(MODEL,
pretrained=False, num_classes=10)`` in eval mode, ``lp.prune(model, x, criterion="l2", amount=0.5)`` at
``x`` of 2x3x64x64 (seed 0). Prints one JSON line: outcome (or the exception), target_met, the reported channel
sparsity, FLOPs after/before, groups left unpruned, whether any conv ended with zero channels, and seconds.
Needs ``pip install timm``; CPU only.
"""
from __future__ import annotations

import json
import sys
import time
import warnings

import torch

import lightning_prune as lp


def run(name: str) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    row: dict = {"model": name}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = lp.prune(model, x, criterion="l2", amount=0.5)
            with torch.no_grad():
                model(x)
            row.update(outcome="pruned", target_met=report.target_met, sparsity=round(report.channel_sparsity, 3),
                       flops_ratio=round(report.flops_after / report.flops_before, 3),
                       left_unpruned=len(getattr(report, "unprunable_widths", {}) or {}),
                       zero_width=[n for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Conv2d) and m.out_channels == 0])
        except Exception as error:  # the outcome is what is measured
            row["outcome"] = f"{type(error).__name__}: {str(error)[:120]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


if __name__ == "__main__":
    for model_name in sys.argv[1:]:
        print(json.dumps(run(model_name)), flush=True)
