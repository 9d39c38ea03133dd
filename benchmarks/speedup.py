"""CPU inference speed-up of physically pruned models, next to their fvcore FLOPs ratio and next to Lightning's
mask-only ``ModelPruning`` at the same amount.

For each model (torchvision ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``vgg16_bn`` at 224×224, batch 8, 1000
classes; the CIFAR ``resnet56`` of :mod:`lightning_prune.models` at 32×32, batch 64, 10 classes), built with a fixed
seed and random weights (latency does not depend on the weight values), in eval mode:

* **dense**: the model as built;
* **lightning-prune**: a copy pruned in place with
  ``prune(model, x[:2], criterion="l2", amount=a, allocation="uniform")`` (channels physically removed);
* **ModelPruning**: a copy pruned the way ``pytorch_lightning.callbacks.ModelPruning`` does it, by calling the
  callback's own methods without a Trainer: ``ModelPruning("ln_structured", amount=a, pruning_dim=0,
  pruning_norm=2, use_global_unstructured=False, parameters_to_prune=[(conv, "weight") for every Conv2d])``,
  then ``apply_pruning(a)`` (what its epoch-end hook runs: ``torch.nn.utils.prune.ln_structured`` on each conv,
  zeroing whole output filters through a mask) and ``make_pruning_permanent(model)`` (what its ``on_train_end``
  runs: the mask is folded into the weight). Tensors keep their shapes, so the expected speed-up is ≈1.0×.
  ``--mp-fn l1_unstructured`` uses its default unstructured method (global L1 over the conv weights) instead.

Latency: ``torch.inference_mode()``, ``--warmup`` forward passes of every variant, then ``--repeats`` rounds; each
round times one forward pass of every variant of the model (``time.perf_counter``), in an order rotated every
round, so slow drifts of a shared machine hit every variant alike. Reported: the median latency of each variant,
and the latency ratio = the median over rounds of (variant time / dense time in the same round). The FLOPs ratio is
fvcore's count of the variant over the dense model's (1 multiply-add = 1 flop, one sample); the parameter ratio
counts stored parameter elements. Goal of the issue: |latency ratio − FLOPs ratio| ≤ 0.10 for lightning-prune.

Run it on an otherwise idle machine with ``--threads`` at most the number of idle cores: oversubscribed intra-op
threads (other processes busy on the same cores) make every timing, pruning included, many times slower and the
ratios noisy.

Usage::

    python benchmarks/speedup.py                  # full run: 5 models, amounts 0.3 and 0.5, 30 rounds, 2 threads
    python benchmarks/speedup.py --quick          # smoke test: resnet56 + resnet18, amount 0.5, 5 rounds
    python benchmarks/speedup.py --models resnet50 --amounts 0.5 --repeats 50 --threads 1

Writes Markdown to ``docs/benchmarks/speedup.md`` (``--quick`` writes to the temporary directory instead, unless
``--out``, so smoke numbers never overwrite the real table) and prints it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_prune.models import create_model  # noqa: E402
from _common import machine_description, write_results  # noqa: E402
from lightning_prune.pruning import prune  # noqa: E402
from lightning_prune.structure import count_flops, count_params  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "speedup.md"
# name -> (input size, batch, classes)
MODELS = {
    "resnet18": (224, 8, 1000),
    "resnet50": (224, 8, 1000),
    "mobilenet_v2": (224, 8, 1000),
    "vgg16_bn": (224, 8, 1000),
    "resnet56": (32, 64, 10),
}
QUICK_MODELS = ["resnet56", "resnet18"]
GOAL = 0.10
OURS, LIGHTNING = "lightning-prune", "ModelPruning"


# -- variants -----------------------------------------------------------------------------------------------------
def build_dense(name: str) -> nn.Module:
    _, _, classes = MODELS[name]
    torch.manual_seed(0)
    return create_model(name, num_classes=classes).eval()


def prune_ours(dense: nn.Module, x: torch.Tensor, amount: float, round_to: int | None) -> tuple[nn.Module, float]:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    prune(model, x[:2], criterion="l2", amount=amount, allocation="uniform", round_to=round_to)
    return model.eval(), time.perf_counter() - start


def prune_lightning(dense: nn.Module, amount: float, method: str) -> tuple[nn.Module, float]:
    """Lightning's ``ModelPruning``, driven through its own methods (no Trainer needed)."""
    from pytorch_lightning.callbacks import ModelPruning

    model = copy.deepcopy(dense)
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    if method == "ln_structured":
        callback = ModelPruning("ln_structured", amount=amount, pruning_dim=0, pruning_norm=2,
                                use_global_unstructured=False, parameters_to_prune=convs, verbose=0)
    else:
        callback = ModelPruning("l1_unstructured", amount=amount, use_global_unstructured=True,
                                parameters_to_prune=convs, verbose=0)
    start = time.perf_counter()
    # What ModelPruning.setup() does with the LightningModule, then its epoch-end pruning and its on_train_end.
    callback._parameters_to_prune = callback.filter_parameters_to_prune(
        ModelPruning.sanitize_parameters_to_prune(model, convs, parameter_names=["weight"]))
    callback.apply_pruning(amount)
    callback.make_pruning_permanent(model)
    return model.eval(), time.perf_counter() - start


def zero_fraction(model: nn.Module) -> float:
    """Fraction of conv weight elements that are exactly zero (what the masks left behind)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


# -- timing -------------------------------------------------------------------------------------------------------
def time_variants(models: list[nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of one forward pass per round and model; the order of the models is rotated every round."""
    samples: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            for _ in range(warmup):
                model(x)
        k = len(models)
        for r in range(repeats):
            for i in [(r + j) % k for j in range(k)]:
                start = time.perf_counter()
                models[i](x)
                samples[i].append(time.perf_counter() - start)
    return samples


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    size, batch, _ = MODELS[name]
    dense = build_dense(name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    one = x[:1]
    flops_dense, params_dense = count_flops(dense, one), count_params(dense)
    with torch.inference_mode():
        reference_shape = dense(x[:2]).shape
    variants: list[dict[str, Any]] = [{"method": "dense", "amount": 0.0, "model": dense, "prune_s": 0.0}]
    for amount in args.amounts:
        model, seconds = prune_ours(dense, x, amount, args.round_to)
        variants.append({"method": OURS, "amount": amount, "model": model, "prune_s": seconds})
        model, seconds = prune_lightning(dense, amount, args.mp_fn)
        variants.append({"method": LIGHTNING, "amount": amount, "model": model, "prune_s": seconds})
    for v in variants:
        with torch.inference_mode():
            shape = v["model"](x[:2]).shape
        if shape != reference_shape:
            raise RuntimeError(f"{name} {v['method']} {v['amount']}: output shape {shape} != {reference_shape}")
        v["flops_ratio"] = count_flops(v["model"], one) / flops_dense
        v["params_ratio"] = count_params(v["model"]) / params_dense
        v["zeros"] = zero_fraction(v["model"])
    gc.collect()
    start = time.perf_counter()
    samples = time_variants([v["model"] for v in variants], x, args.repeats, args.warmup)
    timing_s = time.perf_counter() - start
    rows = []
    for v, times in zip(variants, samples):
        ratios = [t / d for t, d in zip(times, samples[0])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        rows.append({
            "model": name, "size": size, "batch": batch, "method": v["method"], "amount": v["amount"],
            "flops_dense": flops_dense, "params_dense": params_dense, "flops_ratio": v["flops_ratio"],
            "params_ratio": v["params_ratio"], "zeros": v["zeros"], "prune_s": v["prune_s"],
            "median_ms": 1000 * statistics.median(times), "ratio": statistics.median(ratios),
            "ratio_q1": q[0], "ratio_q3": q[2], "timing_s": timing_s,
        })
    return rows


# -- output -------------------------------------------------------------------------------------------------------
def render(rows: list[dict[str, Any]], args: argparse.Namespace, started: str, machine: list[str],
           finished: bool, total_s: float | None) -> str:
    command = "python benchmarks/speedup.py" + (" --quick" if args.quick else "")
    amounts = ", ".join(f"{a:g}" for a in args.amounts)
    mp_desc = (
        "`ModelPruning(\"ln_structured\", amount=a, pruning_dim=0, pruning_norm=2, use_global_unstructured=False, "
        "parameters_to_prune=[every Conv2d weight])`" if args.mp_fn == "ln_structured" else
        "`ModelPruning(\"l1_unstructured\", amount=a, use_global_unstructured=True, "
        "parameters_to_prune=[every Conv2d weight])`"
    )
    lines = [
        "# Inference speed-up of pruned models on CPU",
        "",
        f"Generated by `{command}` (`--amounts {amounts} --repeats {args.repeats} --warmup {args.warmup} "
        f"--threads {args.threads}" + (f" --round-to {args.round_to}" if args.round_to else "")
        + f" --mp-fn {args.mp_fn}`), started {started}"
        + ("." if finished else "; **run in progress** (partial results)."),
        "",
        "Random-weight models in eval mode under `torch.inference_mode()`. **lightning-prune**: "
        "`prune(model, x[:2], criterion=\"l2\", amount=a, allocation=\"uniform\")`, channels physically removed "
        "(a = fraction of the prunable channels). **ModelPruning**: Lightning's callback at the same amount, "
        f"{mp_desc}, "
        "driven through its own `apply_pruning(a)` (its epoch-end step) and `make_pruning_permanent(model)` (its "
        "`on_train_end`) without a Trainer: filters are zeroed, tensor shapes are unchanged.",
        "",
        f"Latency: {args.warmup} warm-up passes per variant, then {args.repeats} rounds timing one forward pass of "
        "every variant of a model, in an order rotated every round. **ms**: median latency of one batch. "
        "**latency ratio**: median over rounds of (variant / dense in the same round), with its interquartile "
        "range; **speed-up** = 1 / latency ratio. **FLOPs ratio**: fvcore count (1 multiply-add = 1 flop) of the "
        "variant / dense. **params ratio**: stored parameter elements / dense. **zeros**: fraction of conv weight "
        "elements equal to 0. **|Δ|** = |latency ratio − FLOPs ratio|; goal: ≤ 0.10 for lightning-prune.",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Results",
        "",
        "| model | input × batch | method | amount | params ratio | FLOPs ratio | zeros | ms | latency ratio (IQR) "
        "| speed-up | \\|Δ\\| | goal ≤ 0.10 | prune s |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        delta = abs(r["ratio"] - r["flops_ratio"])
        if r["method"] == OURS:
            goal = "yes" if delta <= GOAL else "**no**"
        else:
            goal = "–"
        dense = r["method"] == "dense"
        amount = "–" if dense else f"{r['amount']:g}"
        delta_cell = "–" if dense else f"{delta:.3f}"
        prune_cell = "–" if dense else f"{r['prune_s']:.1f}"
        ratio = "1 (reference)" if dense else f"{r['ratio']:.3f} ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f})"
        lines.append(
            f"| `{r['model']}` | {r['size']}² × {r['batch']} | {r['method']} | {amount} | {r['params_ratio']:.3f} "
            f"| {r['flops_ratio']:.3f} | {r['zeros']:.1%} | {r['median_ms']:.1f} | {ratio} | {1 / r['ratio']:.2f}× "
            f"| {delta_cell} | {goal} | {prune_cell} |"
        )
    ours = [r for r in rows if r["method"] == OURS]
    if ours:
        met = [r for r in ours if abs(r["ratio"] - r["flops_ratio"]) <= GOAL]
        lightning = [r["ratio"] for r in rows if r["method"] == LIGHTNING]
        lines += [
            "",
            "## Summary",
            "",
            f"- lightning-prune: latency ratio within 0.10 of the FLOPs ratio in {len(met)} of {len(ours)} "
            f"(model, amount) pairs; speed-ups {min(1 / r['ratio'] for r in ours):.2f}× to "
            f"{max(1 / r['ratio'] for r in ours):.2f}×.",
        ]
        if lightning:
            lines.append(f"- ModelPruning: latency ratios {min(lightning):.3f} to {max(lightning):.3f} (same shapes, "
                         "same FLOPs: no speed-up expected).")
        models_dense = {r["model"]: r for r in rows if r["method"] == "dense"}
        lines.append("- Dense models: " + "; ".join(
            f"`{m}` {r['flops_dense'] / 1e9:.2f} GFLOPs/image, {r['params_dense'] / 1e6:.1f} M params, "
            f"{r['median_ms']:.0f} ms per batch" for m, r in models_dense.items()) + ".")
    lines.append("")
    if total_s is not None:
        lines.append(f"Total wall time {total_s:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: resnet56 + resnet18, amount 0.5, 5 rounds")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default: all five")
    parser.add_argument("--amounts", nargs="+", type=float, default=None, help="channel fractions (default 0.3 0.5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up passes per variant (default 3, 1 quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--round-to", type=int, default=None, help="passed to prune(): keep widths multiples of it")
    parser.add_argument("--mp-fn", choices=("ln_structured", "l1_unstructured"), default="ln_structured",
                        help="ModelPruning's pruning function (default ln_structured: whole filters)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    models = args.models or (QUICK_MODELS if quick else list(MODELS))
    args.amounts = args.amounts or ([0.5] if quick else [0.3, 0.5])
    args.repeats = args.repeats or (5 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    if any(not 0 < a < 1 for a in args.amounts) or args.repeats < 1 or args.warmup < 0:
        parser.error("--amounts must be in (0, 1), --repeats >= 1, --warmup >= 0")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "speedup-quick.md" if quick else DEFAULT_OUT
    torch.set_num_threads(max(1, args.threads))

    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = machine_description(args.threads)
    wall = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in models:
        t0 = time.perf_counter()
        model_rows = bench_model(name, args)
        rows += model_rows
        for r in model_rows:
            if r["method"] != "dense":
                print(f"[{name}] {r['method']:<15} amount {r['amount']:g}: FLOPs ratio {r['flops_ratio']:.3f}, "
                      f"latency ratio {r['ratio']:.3f} ({r['median_ms']:.1f} ms vs "
                      f"{model_rows[0]['median_ms']:.1f} ms dense)", flush=True)
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s (timing {model_rows[0]['timing_s']:.0f} s)",
              flush=True)
        write_results(args.out, render(rows, args, started, machine, finished=False, total_s=None))
        gc.collect()
    table = render(rows, args, started, machine, finished=True, total_s=time.perf_counter() - wall)
    print()
    print(table)
    write_results(args.out, table)
    print(f"written to {args.out}")
    return table


if __name__ == "__main__":
    main()
