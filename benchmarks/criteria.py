"""Benchmark of the pruning criteria on real data (scikit-learn digits, nothing to download).

For each model (the quick-start ``digits_cnn`` on 16×16 digits, and a CIFAR ResNet-20 on digits upscaled to 32×32)
and each seed: train a base model; then for every criterion (each also with ``+variety``, plus one ``Blend``) and
every FLOPs-reduction target, prune a copy of the base model in one shot to the target, measure test accuracy
without fine-tuning, fine-tune it the same short way, and measure again. The FLOPs target is met with one uniform
channel fraction for every group, found by bisection on :class:`~lightning_prune.structure.FlopsModel`, and
checked with fvcore afterwards.

    python benchmarks/criteria.py            # full run: 3 seeds, 50% and 75% FLOPs reduction, both models
    python benchmarks/criteria.py --quick    # smoke test, < 2 minutes on a laptop CPU

Prints a Markdown table of mean ± std accuracy and scoring wall time per criterion and writes it to
``docs/benchmarks/criteria.md`` (``--quick`` writes to the temporary directory instead, unless ``--out``, so smoke
numbers never overwrite the real table).
A plain training loop is used (no Lightning), so the numbers isolate the criteria.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lightning_prune.criteria import BNScale, Blend, Criterion, Variety, get, score_groups  # noqa: E402
from lightning_prune.structure import DependencyGraph, FlopsModel, count_flops, recalibrate_batchnorm  # noqa: E402

BASE_CRITERIA = ["l1", "l2", "fpgm", "fermat", "bn_scale", "random", "taylor", "apoz", "activation_mean", "hrank",
                 "tt", "snr", "fdr", "sd"]
BLEND_POOL = ["l1", "fpgm", "bn_scale", "taylor", "apoz", "sd"]
# "+variety(keep)": the variety step cut into as many clusters as channels are kept (paper 4's other option),
# instead of the default distance threshold τ = 0.5.
KEEP_VARIETY = ["l1", "l2", "fpgm", "taylor", "sd"]
ALL_CRITERIA = (BASE_CRITERIA + [f"{c}+variety" for c in BASE_CRITERIA] + [f"{c}+variety(keep)" for c in KEEP_VARIETY]
                + ["blend"])
QUICK_RESNET_CRITERIA = ["l1", "taylor", "sd", "l1+variety", "blend"]
MODELS = {"digits_cnn": 16, "resnet20": 32}  # model -> image size
NUM_CLASSES = 10


# -- data --------------------------------------------------------------------------------------------------------
def load_digits_splits(seed: int = 42):
    """Stratified train / validation (held out: scoring and Blend fitness) / test split of the 1,797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    pool, test = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(pool, test_size=0.1, stratify=digits.target[pool], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    try:
        from lightning_prune.datamodules.digits import DIGITS_MEAN, DIGITS_STD
    except Exception:  # pragma: no cover - the datamodule is optional here
        DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3761
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if size != x.shape[-1] else x
    return (x - DIGITS_MEAN) / DIGITS_STD


def batches(x: torch.Tensor, y: torch.Tensor, size: int, shuffle: bool = False, generator=None):
    order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


# -- models ------------------------------------------------------------------------------------------------------
def make_model(name: str) -> nn.Module:
    try:
        from lightning_prune.models import create_model

        return create_model(name, num_classes=NUM_CLASSES, in_channels=1)
    except Exception as error:  # pragma: no cover - fallback while the model zoo is being written
        if name != "digits_cnn":
            raise
        print(f"(create_model unavailable: {error}; using a local digits CNN)")
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES),
        )


def train(model: nn.Module, data, epochs: float, lr: float, seed: int, batch_size: int = 64) -> None:
    """Adam with a cosine schedule; ``epochs`` may be fractional (a number of steps)."""
    x, y = data
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < total:
        for xb, yb in batches(x, y, batch_size, shuffle=True, generator=generator):
            if step >= total:
                break
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            scheduler.step()
            step += 1
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 256) -> float:
    model.eval()
    x, y = data
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, batch_size))
    return correct / len(y)


# -- pruning to a FLOPs target -------------------------------------------------------------------------------------
def removal_counts(graph: DependencyGraph, flops: FlopsModel, target: float) -> tuple[dict[str, int], float]:
    """Channels to remove per group for one uniform fraction, the smallest meeting ``target`` (bisection on the
    predicted FLOPs). Counts respect each group's ``divisions`` and keep at least ``min_size`` channels."""
    groups = graph.groups
    full = flops.predict({})

    def counts(fraction: float) -> dict[str, int]:
        out = {}
        for g in groups:
            n = int(fraction * g.size) // g.divisions * g.divisions
            out[g.name] = max(0, min(n, g.size - max(g.min_size, 1)))
        return out

    def reduction(fraction: float) -> float:
        c = counts(fraction)
        return 1.0 - flops.predict({g.name: g.size - c[g.name] for g in groups}) / full

    lo, hi = 0.0, 1.0
    if reduction(hi) < target:
        return counts(hi), reduction(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reduction(mid) >= target else (mid, hi)
    return counts(hi), reduction(hi)


def build_criterion(name: str, quick: bool, keep_fraction: float = 0.5) -> Criterion:
    def base(n: str) -> Criterion:
        if n == "bn_scale":
            return BNScale(fallback="l1")  # the classifier's hidden Linear group has no BatchNorm
        if n in ("tt", "snr", "fdr", "sd"):
            return get(n, num_classes=NUM_CLASSES)
        return get(n)

    if name == "blend":
        return Blend([base(n) for n in BLEND_POOL], population=4 if quick else 20, generations=1 if quick else 10,
                     seed=0, progress=False)
    if name.endswith("+variety(keep)"):
        return Variety(base(name[: -len("+variety(keep)")]), n_clusters=keep_fraction)
    if name.endswith("+variety"):
        return Variety(base(name[: -len("+variety")]))
    return base(name)


@dataclass
class Result:
    pruned: list[float] = field(default_factory=list)
    pruned_bn: list[float] = field(default_factory=list)
    tuned: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    reduction: list[float] = field(default_factory=list)


def prune_and_tune(base_model, example, splits, criterion_name, target, args, seed) -> tuple[float, ...]:
    model = copy.deepcopy(base_model).eval()
    graph = DependencyGraph(model, example)
    flops = FlopsModel(graph, example)
    before = count_flops(model, example)
    counts, _ = removal_counts(graph, flops, target)
    keep_fraction = 1.0 - sum(counts.values()) / sum(g.size for g in graph.groups)
    criterion = build_criterion(criterion_name, args.quick, keep_fraction)
    score_data = batches(*splits["train"], 64)
    start = time.perf_counter()
    scores = score_groups(model, graph.groups, criterion, score_data, scoring_batches=args.scoring_batches)
    blend = criterion.base if isinstance(criterion, Variety) else criterion
    if isinstance(blend, Blend):
        blend.search(graph, lambda: accuracy(model, splits["val"]), counts)
        scores = {g.name: criterion.score(g) for g in graph.groups}
    seconds = time.perf_counter() - start
    removals = {g.name: g.lowest(scores[g.name], counts[g.name]) for g in graph.groups if counts[g.name] > 0}
    graph.prune_groups(removals)
    reduction = 1.0 - count_flops(model, example) / before
    pruned_acc = accuracy(model, splits["test"])
    # Stale BatchNorm statistics, not the choice of channels, dominate accuracy right after pruning; measure
    # both (on a copy: fine-tuning starts from the pruned model as it is).
    recalibrated = copy.deepcopy(model)
    recalibrate_batchnorm(recalibrated, batches(*splits["train"], 64), num_batches=8)
    pruned_bn_acc = accuracy(recalibrated, splits["test"])
    train(model, splits["train"], args.finetune_epochs, args.finetune_lr, seed + 1000)
    return pruned_acc, pruned_bn_acc, accuracy(model, splits["test"]), seconds, reduction


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 50%% target, tiny training")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--criteria", nargs="+", default=None, help=f"default: all ({len(ALL_CRITERIA)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--targets", nargs="+", type=float, default=None, help="FLOPs reductions, e.g. 0.5 0.75")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs of the base model")
    parser.add_argument("--finetune-epochs", type=float, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--scoring-batches", type=int, default=None, help="batches of 64 for data criteria")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny nets)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save-base", type=Path, default=None,
                        help="save each trained base model here as <model>_seed<seed>.pt (benchmarks/analysis.py "
                             "reuses them)")
    parser.add_argument("--reuse-base", action="store_true",
                        help="load base models already saved in --save-base instead of training them again")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.targets = args.targets or ([0.5] if quick else [0.5, 0.75])
    quick_epochs = {"digits_cnn": 2.0, "resnet20": 1.0}
    args.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (0.25 if quick else 3)
    args.scoring_batches = args.scoring_batches or (2 if quick else 8)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "criteria-quick.md" if quick else ROOT / "docs" / "benchmarks" / "criteria.md"
    torch.set_num_threads(max(1, args.threads))

    if args.epochs is not None:
        train_desc = f"{args.epochs:g} epochs"
    elif quick:
        train_desc = ", ".join(f"{quick_epochs[m]:g} epoch(s) for {m}" for m in args.models)
    else:
        train_desc = "20 epochs"
    splits_raw = load_digits_splits()
    lines = [
        "# Pruning criteria on scikit-learn digits",
        "",
        f"Generated by `python benchmarks/criteria.py{' --quick' if quick else ''}`: seeds {args.seeds}, base "
        f"training {train_desc} (Adam {args.lr:g}, cosine), one-shot pruning to each FLOPs-reduction "
        f"target with one uniform channel fraction, then {args.finetune_epochs:g} fine-tuning epochs "
        f"(Adam {args.finetune_lr:g}). Accuracy on the 360-image test split, mean ± std over seeds, in %. "
        f"\"pruned\" = right after pruning, \"+BN\" = the same after re-estimating BatchNorm statistics on 8 training "
        "batches (weights untouched), \"tuned\" = after fine-tuning (from the pruned model, without that "
        "re-estimation). Data criteria score "
        f"{args.scoring_batches} training batches of 64; Blend searches its weights on the validation split. "
        "\"score s\" = wall time of scoring (and, for Blend, its search), mean over runs, "
        f"{args.threads} CPU thread(s).",
        "",
    ]
    wall = time.perf_counter()
    for model_name in args.models:
        size = MODELS[model_name]
        splits = {k: (resize(x, size), y) for k, (x, y) in splits_raw.items()}
        example = splits["train"][0][:2]
        names = args.criteria or (QUICK_RESNET_CRITERIA if quick and model_name == "resnet20" else ALL_CRITERIA)
        results = {(n, t): Result() for n in names for t in args.targets}
        base_acc = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            base_model = make_model(model_name)
            t0 = time.perf_counter()
            epochs = args.epochs if args.epochs is not None else (quick_epochs[model_name] if quick else 20.0)
            saved = args.save_base / f"{model_name}_seed{seed}.pt" if args.save_base is not None else None
            if args.reuse_base and saved is not None and saved.exists():
                base_model.load_state_dict(torch.load(saved, weights_only=True))
                base_model.eval()
            else:
                train(base_model, splits["train"], epochs, args.lr, seed)
            base_acc.append(accuracy(base_model, splits["test"]))
            if args.save_base is not None:
                args.save_base.mkdir(parents=True, exist_ok=True)
                torch.save(base_model.state_dict(), args.save_base / f"{model_name}_seed{seed}.pt")
            print(f"[{model_name} seed {seed}] base accuracy {base_acc[-1]:.3f} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
            for target in args.targets:
                for name in names:
                    pruned, pruned_bn, tuned, seconds, reduction = prune_and_tune(base_model, example, splits, name, target,
                                                                       args, seed)
                    r = results[(name, target)]
                    r.pruned.append(pruned), r.pruned_bn.append(pruned_bn), r.tuned.append(tuned)
                    r.seconds.append(seconds)
                    r.reduction.append(reduction)
                    print(f"  {name:<24} target {target:.0%}: FLOPs -{reduction:.1%} pruned {pruned:.3f} "
                          f"+BN {pruned_bn:.3f} tuned {tuned:.3f} score {seconds:.2f} s", flush=True)
        flops = count_flops(make_model(model_name).eval(), example)
        achieved = ", ".join(
            f"{t:.0%} → {statistics.fmean(v for n in names for v in results[(n, t)].reduction):.1%}"
            for t in args.targets
        )
        lines += [
            f"## {model_name} ({size}×{size}, {flops / 1e6:.2f} MFLOPs, base accuracy {fmt(base_acc)}%)",
            "",
            f"FLOPs reduction measured by fvcore after pruning (target → achieved, mean): {achieved}.",
            "",
            "| criterion | " + " | ".join(f"{t:.0%} pruned | {t:.0%} +BN | {t:.0%} tuned" for t in args.targets)
            + " | score s |",
            "|---|" + "---:|---:|---:|" * len(args.targets) + "---:|",
        ]
        for name in names:
            cells = [f"{fmt(results[(name, t)].pruned)} | {fmt(results[(name, t)].pruned_bn)} | "
                     f"{fmt(results[(name, t)].tuned)}" for t in args.targets]
            seconds = [s for t in args.targets for s in results[(name, t)].seconds]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(seconds):.2f} |")
        lines.append("")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")  # partial results survive an interrupted run
    lines.append(f"Total wall time {time.perf_counter() - wall:.0f} s.")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"written to {args.out}")
    return table


if __name__ == "__main__":
    main()
