"""Accuracy at equal measured latency: latency targeting vs FLOPs targeting on the digits with CIFAR ResNet-20.

One dense ResNet-20 (1 input channel, 16x16 digits) is trained for ``--epochs``; copies are pruned one-shot with
the L2 criterion, (a) ``latency_reduction=r`` and (b) ``flops_reduction=f`` for several ``f``, each fine-tuned for
``--finetune`` epochs (SGD, same seed and data order) and evaluated on the test split. The latency ratio of each
variant is measured interleaved with the dense model (batch ``--batch``, one thread, ``--placements`` memory
placements per ``--rounds`` rounds, extended until the ratio's standard error is 1 % or 4 x ``--rounds``); FLOPs
targeting's accuracy at the latency variant's measured ratio is interpolated linearly between the two nearest
FLOPs variants, and the per-seed paired difference is summarized.

    python benchmarks/latency_accuracy.py --target 0.5 --seeds 0 1 2
    python benchmarks/latency_accuracy.py --target 0.5 --seeds $(seq -s ' ' 0 19)   # docs/benchmarks.md, section 7

Prints a Markdown table (and writes it to ``docs/benchmarks/latency_accuracy.md``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_description, write_results  # noqa: E402
from lightning_prune.datamodules import DigitsDataModule  # noqa: E402
from lightning_prune.models import create_model  # noqa: E402
from lightning_prune.pruning import prune  # noqa: E402
from lightning_prune.structure import count_flops  # noqa: E402
from lightning_prune.structure.latency import time_pair  # noqa: E402

IMAGE = 16


def train(model, loader, epochs: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def run_seed(args, seed: int, dm) -> list[dict]:
    """Dense model and every variant for one seed (model init, training order and fine-tuning all seeded)."""
    torch.manual_seed(seed)
    dense = create_model("resnet20", num_classes=10, in_channels=1)
    train(dense, dm.train_dataloader(), args.epochs, 0.1, seed=seed)
    dense.eval()
    x = torch.randn(args.batch, 1, IMAGE, IMAGE)
    example = x[:2]
    rows = [{"variant": "dense", "latency_ratio": 1.0, "flops_ratio": 1.0, "acc": accuracy(dense, dm.test_dataloader())}]
    dense_flops = count_flops(dense, example[:1])
    cache = tempfile.mkdtemp()
    variants = [("latency_reduction", args.target)] + [("flops_reduction", f) for f in args.flops]
    for kind, value in variants:
        model = copy.deepcopy(dense)
        extra = dict(latency_input=x, latency_cache=cache, round_to=args.round_to) if kind == "latency_reduction" \
            else {}
        prune(model, example, args.criterion, **extra, **{kind: value})
        train(model, dm.train_dataloader(), args.finetune, 0.02, seed=seed + 1)
        model.eval()
        timing = time_pair(dense, model, x, rounds=args.rounds, placements=args.placements, precision=0.01,
                           max_rounds=4 * args.rounds)
        rows.append({"variant": f"{kind}={value}", "latency_ratio": timing.ratio, "latency_se": timing.standard_error,
                     "flops_ratio": count_flops(model, example[:1]) / dense_flops,
                     "acc": accuracy(model, dm.test_dataloader()), "seed": seed})
        print(seed, rows[-1], flush=True)
    return rows


def interpolate(rows: list[dict]) -> float | None:
    """FLOPs targeting's accuracy at the latency variant's measured ratio (linear between the two FLOPs variants
    around it, ordered by measured latency)."""
    at = rows[1]["latency_ratio"]
    flops_rows = sorted(rows[2:], key=lambda r: r["latency_ratio"])
    for a, b in zip(flops_rows, flops_rows[1:]):
        if a["latency_ratio"] <= at <= b["latency_ratio"] and b["latency_ratio"] > a["latency_ratio"]:
            w = (at - a["latency_ratio"]) / (b["latency_ratio"] - a["latency_ratio"])
            return a["acc"] + w * (b["acc"] - a["acc"])
    return None


def _mean_std(values: list[float]) -> str:
    import statistics

    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f} %"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--flops", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--placements", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--criterion", default="l2")
    parser.add_argument("--round-to", dest="round_to", default=None,
                        help="round_to of the latency variant (an integer or 'auto'; default None)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "latency_accuracy.md"))
    args = parser.parse_args(argv)
    if args.round_to not in (None, "auto"):
        args.round_to = int(args.round_to)
    torch.set_num_threads(1)
    machine = machine_description(1)
    dm = DigitsDataModule(image_size=IMAGE, batch_size=64, seed=0)  # one fixed split: seeds vary the training
    dm.setup("fit")
    dm.setup("test")
    lines = ["# Accuracy at equal measured latency (digits, ResNet-20, CPU one thread)", "",
             f"`python benchmarks/latency_accuracy.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             *machine, "",
             f"Dense trained {args.epochs} epochs; each variant pruned one-shot ({args.criterion}) and fine-tuned "
             f"{args.finetune} epochs; latency at batch {args.batch}, {IMAGE}x{IMAGE}, interleaved with the dense "
             f"model over {args.placements} memory placements per {args.rounds} rounds (median of per-round ratios, "
             f"+- its standard error). Seeds {args.seeds} (model init, data order, fine-tuning; the test split is "
             "fixed).", "",
             "| seed | variant | measured latency ratio | FLOPs ratio | test accuracy |", "|---|---|---|---|---|"]
    latency_acc, flops_acc, dense_acc, paired = [], [], [], []
    for seed in args.seeds:
        rows = run_seed(args, seed, dm)
        lines += [f"| {seed} | {r['variant']} | {r['latency_ratio']:.3f}"
                  + (f" +- {r['latency_se']:.3f}" if 'latency_se' in r else "") + f" | {r['flops_ratio']:.3f} | "
                  f"{100 * r['acc']:.2f} % |" for r in rows]
        dense_acc.append(rows[0]["acc"])
        latency_acc.append(rows[1]["acc"])
        at = interpolate(rows)
        if at is not None:
            flops_acc.append(at)
            paired.append(rows[1]["acc"] - at)
        lines.append(f"| {seed} | FLOPs targeting interpolated at {rows[1]['latency_ratio']:.3f} | | | "
                     + (f"{100 * at:.2f} % |" if at is not None else "outside the FLOPs variants' range |"))
        write_results(Path(args.out), "\n".join(lines) + "\n")
    lines += ["", f"Mean ± std over seeds: dense {_mean_std(dense_acc)}; latency_reduction={args.target} "
              f"{_mean_std(latency_acc)}; FLOPs targeting at the same measured latency {_mean_std(flops_acc)} "
              f"({len(flops_acc)} of {len(args.seeds)} seeds inside the FLOPs variants' latency range)."]
    if len(paired) > 1:
        import statistics

        mean, se = statistics.mean(paired), statistics.stdev(paired) / len(paired) ** 0.5
        lines.append(f"Paired difference, latency minus FLOPs targeting, per seed: "
                     f"{', '.join(f'{100 * d:+.2f}' for d in paired)} points; mean {100 * mean:+.2f} ± "
                     f"{100 * se:.2f} (standard error).")
    text = "\n".join(lines) + "\n"
    write_results(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
