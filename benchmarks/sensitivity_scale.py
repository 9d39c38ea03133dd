"""Sensitivity analysis (paper 2) at scale: image-forwards per event per rank and wall time, before and after.

Parts (``--part``; each writes ``docs/benchmarks/sensitivity_scale_<part>.json``; the tables of
``docs/benchmarks/sensitivity_scale.md`` are written from them by hand):

- ``scale``: CIFAR ResNet-20/56 (random init, random 32x32 inputs and labels, 2 x 32 validation images as in
  issue #12, ``criterion="l1"``, target 44.3 % FLOPs, the paper's m = 0.8 and one group per round). "before" is
  today's procedure (``early_exit=False``, every trial and the baseline on the whole split); it is run once with
  a recording evaluator that keeps every trial's per-batch correct counts, so the exact-mode early exit at any
  rank count (trials dealt round-robin as ``_TrialRunner`` does, each rank bounding with its own finished
  trials) is replayed exactly from it. "after" runs exact mode with early exit (measured, decisions checked equal
  to "before") and fast mode (measured).
- ``cost``: the cost model (rounds x trials x images from ``trial_sizes`` and the FLOPs target, FLOPs predicted
  without tracing, the chosen group drawn at random since accuracies are unknown) for ResNet-20/56/110,
  torchvision ResNet-18 at 64x64 and ResNet-50 at 224x224; for ResNet-50 checked against a measured run of its
  first two rounds (random init, 2 x 4 random images: enough to count), and the 8-rank projection.
- ``ddp``: ResNet-20 as in ``scale``, 1 rank vs 2 gloo ranks on the CPU (``shard="groups"`` and ``"data"``).
- ``agreement``: fast vs exact on digits ResNet-20 (and ResNet-56): per-group widths and test accuracy after a
  short fine-tune.
- ``replay``: exact mode with separate full passes (``reuse_prefix=False``) vs the prefix replay (default):
  same decisions (checked), image-forwards and full-forward equivalents (MAC-weighted), wall; for ResNet-50 at
  224 two real rounds give the measured share of a trial's MACs that replay computes, which the 8-rank projection
  uses.

    PYTHONPATH=src python benchmarks/sensitivity_scale.py --part scale
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_description, write_results  # noqa: E402

from lightning_prune.allocation import AccuracyEvaluator, SensitivityAllocator  # noqa: E402
from lightning_prune.allocation.strategies import PredictedFlops  # noqa: E402
from lightning_prune.allocation.sensitivity import lazy_margin_count  # noqa: E402
from lightning_prune.models import create_model  # noqa: E402
from lightning_prune.structure import DependencyGraph, FlopsModel, count_flops  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
TARGET = 0.443
THREADS = 1
TAG = ""


# -- models and data ---------------------------------------------------------------------------------------------
def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(seed)
    if name == "resnet18@64":
        import torchvision

        return torchvision.models.resnet18(num_classes=10).eval(), 64
    if name == "resnet50@224":
        import torchvision

        return torchvision.models.resnet50().eval(), 224
    return create_model(name, num_classes=10).eval(), 32


def random_split(side: int, batches: int = 2, size: int = 32, classes: int = 10, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, side, side, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(batches)]


class RecordingEvaluator(AccuracyEvaluator):
    """Keeps every pass's per-batch correct counts (call order), for replaying early exit offline."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes: list[list[int]] = []

    def correct(self, at_least=None):
        batches, per_batch = self.batches(), []
        self.evaluations += 1
        with self._evaluation_mode() as device:
            for inputs, labels in batches:
                out = self.model(inputs.to(device))
                per_batch.append(int((out.argmax(1).cpu() == labels).sum()))
                self.images += int(labels.numel())
        self.passes.append(per_batch)
        return sum(per_batch), self.total


def prune_sensitivity(model, split, side, **options):
    """One event to 44.3 % FLOPs; the recording evaluator (``record=True``) for "before"."""
    record = options.pop("record", False)
    evaluator = (RecordingEvaluator if record else AccuracyEvaluator)(model, split)
    start = time.perf_counter()
    report = _prune(model, side, evaluator, options)
    return report, evaluator, time.perf_counter() - start


def _prune(model, side, evaluator, options):
    """:func:`lightning_prune.prune` with our own evaluator (the recording one for "before")."""
    from lightning_prune.criteria import get
    from lightning_prune.pruning import prune_event

    graph = DependencyGraph(model, torch.zeros(2, 3, side, side))
    return prune_event(graph, get("l1"), TARGET, target_kind="flops", allocation="sensitivity", evaluate=evaluator,
                       sensitivity={"progress": False, **options}, source="benchmark")


# -- replaying exact-mode early exit from the recorded full passes -------------------------------------------------
def replay(report, passes: list[list[int]], sizes: list[int], world: int, num_groups: int = 1,
           baseline: bool = True) -> dict:
    """Image-forwards per rank of exact mode with early exit over ``world`` ranks (groups sharding), from the
    full per-batch counts of the "before" run (same decisions, so the same rounds and trials)."""
    total, cursor, order, order_before_full = sum(sizes), 0, [], []
    per_rank = [0] * world
    for step in report.sensitivity_steps:
        names = list(step["trials"])  # module order
        calls = _call_order(names, order_before_full)
        full = dict(zip([*calls, ""], passes[cursor:cursor + len(names) + 1]))
        cursor += len(names) + 1
        order_before_full = sorted(names, key=lambda n: (-sum(full[n]), n))
        items = _call_order(names, order)
        items = items + ([""] if baseline else [])
        keys = {}
        for rank in range(world):
            done = []
            for name in items[rank::world]:
                threshold = None
                exact = sorted((k for n, k, e in done if n and e), reverse=True)
                if name and len(exact) >= num_groups:
                    threshold = exact[num_groups - 1]
                correct = seen = 0
                for count, size in zip(full[name], sizes):
                    if threshold is not None and correct + (total - seen) < threshold:
                        break
                    correct, seen = correct + count, seen + size
                per_rank[rank] += seen
                key = correct + total - seen
                done.append((name, key, seen >= total))
                keys[name] = key
        order = sorted(names, key=lambda n: (-keys[n], n))
    return {"world": world, "max_per_rank": max(per_rank), "mean_per_rank": sum(per_rank) / world}


def _call_order(names, previous):
    known = [n for n in previous if n in names]
    return known + [n for n in names if n not in set(known)]


def decisions(report) -> list:
    return [(s["chosen"], s["removed"]) for s in report.sensitivity_steps]


# -- part: scale -------------------------------------------------------------------------------------------------
def part_scale(args) -> dict:
    results = {}
    for name in args.models:
        model, side = build(name)
        split = random_split(side)
        sizes = [len(y) for _, y in split]
        before, recorder, before_wall = prune_sensitivity(copy.deepcopy(model), split, side, early_exit=False,
                                                          record=True)
        row = {"rounds": len(before.sensitivity_steps), "evaluations_before": len(recorder.passes),
               "images_before": recorder.images, "wall_before_s": before_wall,
               "replay": {w: replay(before, recorder.passes, sizes, w) for w in (1, 2, 8)},
               "replay_no_baseline": {w: replay(before, recorder.passes, sizes, w, baseline=False) for w in (1, 8)}}
        after, evaluator, wall = prune_sensitivity(copy.deepcopy(model), split, side)
        row.update(images_exact=evaluator.images, wall_exact_s=wall, exact_same_decisions=decisions(after) == decisions(before),
                   reduction=after.flops_reduction)
        fast, evaluator, wall = prune_sensitivity(copy.deepcopy(model), split, side, mode="fast")
        row.update(images_fast=evaluator.images, wall_fast_s=wall, rounds_fast=len(fast.sensitivity_steps),
                   fast_reduction=fast.flops_reduction)
        results[name] = row
        print(name, json.dumps(row), flush=True)
        dump("scale", results)
    return results


# -- part: cost --------------------------------------------------------------------------------------------------
def simulate(graph, flops_model, allocator, seed: int) -> dict:
    """Rounds and evaluations to the target with FLOPs predicted (no accuracy: the chosen groups are drawn at
    random, seeded; ``trial_sizes`` and the trimming to the goal are the allocator's)."""
    rng = random.Random(seed)
    widths = {g.name: g.size for g in graph.groups}
    groups = {g.name: g for g in graph.groups}
    goal = flops_model.total_measured * (1 - TARGET)
    rounds = trials = 0
    current = flops_model
    while current.predict({}) > goal:
        view = SimpleNamespace(groups=[SimpleNamespace(name=n, size=widths[n], divisions=groups[n].divisions,
                                                       min_size=groups[n].min_size,
                                                       original_size=groups[n].original_size) for n in widths])
        sizes = allocator.trial_sizes(view, current)
        if not sizes:
            break
        rounds += 1
        trials += len(sizes)
        for name in rng.sample(sorted(sizes), min(allocator.num_groups, len(sizes))):
            widths[name] -= sizes[name]
        current = PredictedFlops(flops_model, widths)
    return {"rounds": rounds, "trials": trials, "trials_per_round": trials / max(rounds, 1)}


def prefix_share(model, graph, side) -> dict[str, float]:
    """Per group: fraction of a forward's FLOPs computed before the group's first consumer runs (identical to the
    unmasked network's, so a batched evaluation could share it)."""
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: order.append(name))
             for n, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    flops = count_flops(model, torch.zeros(1, 3, side, side), per_module=True)
    total = flops[""]
    position = {n: i for i, n in enumerate(order)}
    cumulative, run = [], 0
    for n in order:
        cumulative.append(run)
        run += flops.get(n, 0)
    shares = {}
    for g in graph.groups:
        first = min(position[m.module_name] for m in g.consumers if m.module_name in position)
        shares[g.name] = cumulative[first] / total
    return shares


def part_cost(args) -> dict:
    results = {}
    for name in args.models:
        model, side = build(name)
        graph = DependencyGraph(model, torch.zeros(2, 3, side, side))
        flops_model = FlopsModel(graph, torch.zeros(2, 3, side, side))
        allocator = SensitivityAllocator(progress=False)
        sims = [simulate(graph, flops_model, allocator, seed) for seed in range(3)]
        shares = prefix_share(model, graph, side)
        sizes0 = allocator.trial_sizes(graph, flops_model)
        row = {"groups": len(graph.groups), "eligible_round0": len(sizes0), "k_round0": sorted(sizes0.values()),
               "flops": flops_model.total_measured, "simulations": sims,
               "prefix_share_mean": sum(shares[n] for n in sizes0) / len(sizes0)}
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "k_round0"}), flush=True)
        dump("cost", results)
    if "resnet50@224" in args.models:
        results["resnet50@224"]["measured"] = measured_first_rounds()
        dump("cost", results)
    return results


def measured_first_rounds() -> dict:
    """ResNet-50 at 224: two real rounds (random init, 2 x 4 random images): evaluations and images counted, FLOPs
    removed per round measured by fvcore, to check the cost model's inputs."""
    model, side = build("resnet50@224")
    split = random_split(side, batches=2, size=4, classes=1000)
    evaluator = AccuracyEvaluator(model, split)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _prune(model, side, evaluator, {"max_rounds": 2})
    steps = report.sensitivity_steps
    return {"rounds": len(steps), "trials_per_round": [len(s["trials"]) for s in steps],
            "images": evaluator.images, "evaluations": evaluator.evaluations, "split": evaluator.total,
            "flops_removed_fraction": 1 - report.flops_after / report.flops_before,
            "removed": [s["removed"] for s in steps], "wall_s": time.perf_counter() - start}


# -- part: replay ------------------------------------------------------------------------------------------------
def part_replay(args) -> dict:
    results = {}
    for name in args.models:
        model, side = build(name)
        if name == "resnet50@224":
            results[name] = replay_first_rounds(model, side)
        else:
            split = random_split(side)
            full, full_eval, full_wall = prune_sensitivity(copy.deepcopy(model), split, side, reuse_prefix=False)
            fast, evaluator, wall = prune_sensitivity(copy.deepcopy(model), split, side)
            results[name] = {
                "rounds": len(fast.sensitivity_steps), "same_decisions": decisions(full) == decisions(fast),
                "same_plan": full.plan == fast.plan, "full_images": full_eval.images,
                "full_forward_equivalents": full_eval.forward_equivalents, "full_wall_s": full_wall,
                "replay_images": evaluator.images, "replay_forward_equivalents": evaluator.forward_equivalents,
                "replay_wall_s": wall, "split": evaluator.total}
        print(name, json.dumps(results[name]), flush=True)
        dump("replay", results)
    return results


def replay_first_rounds(model, side, rounds: int = 2) -> dict:
    """Two real rounds with prefix replay: per trial the share of a forward's MACs it computed."""
    split = random_split(side, batches=2, size=4, classes=1000)
    evaluator = AccuracyEvaluator(model, split)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _prune(model, side, evaluator, {"max_rounds": rounds})
    steps = report.sensitivity_steps
    trials = [len(s["trials"]) for s in steps]
    per_round = [s["forward_equivalents"] / evaluator.total for s in steps]  # forwards of the whole split
    return {"rounds": len(steps), "trials_per_round": trials, "forward_equivalents_per_round": per_round,
            "images": evaluator.images, "forward_equivalents": evaluator.forward_equivalents,
            "mean_trial_share": [(f - 1) / t for f, t in zip(per_round, trials)], "wall_s": time.perf_counter() - start}


# -- part: ddp ---------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, shard: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_prune.callbacks.distributed import TorchCollective

    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, side = build("resnet20")
        collective = TorchCollective(rank, world)
        evaluator = AccuracyEvaluator(model, random_split(side), collective=collective, shard_data=shard == "data")
        from lightning_prune.criteria import get
        from lightning_prune.pruning import prune_event

        graph = DependencyGraph(model, torch.zeros(2, 3, side, side))
        dist.barrier()
        start = time.perf_counter()
        report = prune_event(graph, get("l1"), TARGET, target_kind="flops", allocation="sensitivity",
                             evaluate=evaluator, collective=collective, source="benchmark",
                             sensitivity={"progress": False, "shard": shard})
        wall = time.perf_counter() - start
        plans = collective.gather(json.dumps(report.plan, sort_keys=True, default=str))
        torch.save({"wall": wall, "images": evaluator.images, "same_plan": len(set(plans)) == 1,
                    "rounds": len(report.sensitivity_steps)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def part_ddp(args) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    results = {}
    for world, shard in ((1, "groups"), (2, "groups"), (2, "data")):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_ddp_worker, args=(world, shard, 29500 + random.randint(0, 2000), tmp), nprocs=world)
            ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
        results[f"{world}x{shard}"] = {"world": world, "shard": shard, "wall_s": max(r["wall"] for r in ranks),
                                       "images_per_rank": [r["images"] for r in ranks],
                                       "same_plan": all(r["same_plan"] for r in ranks), "rounds": ranks[0]["rounds"]}
        print(world, shard, json.dumps(results[f"{world}x{shard}"]), flush=True)
        dump("ddp", results)
    return results


# -- part: agreement ---------------------------------------------------------------------------------------------
def _train(model, loader, epochs: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def _accuracy(model, loader) -> float:
    with torch.no_grad():
        hits = [(int((model(x).argmax(1) == y).sum()), len(y)) for x, y in loader]
    return sum(h for h, _ in hits) / sum(n for _, n in hits)


def agreement(a: dict, b: dict) -> dict:
    equal = sum(a[n] == b[n] for n in a) / len(a)
    weighted = 1 - sum(abs(a[n] - b[n]) for n in a) / sum(b.values())
    return {"equal_width_fraction": equal, "width_agreement": weighted}


def lazy_along_exact(steps: list[dict], total: int, top_k: int = 4, refresh_every: int = 4) -> dict:
    """Fast mode's lazy rounds replayed on exact mode's own measurements (every trial of every round): in how
    many rounds the lazy choice equals exact's, and the share of trials it measures. Free of the chaos of two
    trajectories that part after one different choice (one group per round)."""
    estimates: dict[str, float] = {}
    same = measured = offered = 0
    for index, step in enumerate(steps):
        accuracy = {name: trial["accuracy"] for name, trial in step["trials"].items()}
        offered += len(accuracy)
        if index % refresh_every == 0:
            fresh = dict(accuracy)
        else:
            estimate = lambda n: estimates.get(n, float("inf"))
            pending = sorted(accuracy, key=lambda n: (-estimate(n), n))
            fresh = {}
            top = estimate(pending[0])  # the allocator's first chunk: every estimate within the margin of the best
            bar = top - lazy_margin_count(min(top, 1.0) * total, total) / total
            size = max(top_k, sum(estimate(n) >= bar for n in pending))
            while pending:
                chunk, pending, size = pending[:size], pending[size:], top_k
                fresh.update({n: accuracy[n] for n in chunk})
                best = max(fresh.values())
                margin = lazy_margin_count(best * total, total) / total  # the allocator's default lazy_margin
                if not pending or best >= estimates.get(pending[0], float("inf")) + margin:
                    break
        measured += len(fresh)
        estimates.update(fresh)
        same += min(fresh, key=lambda n: (-fresh[n], n)) == min(accuracy, key=lambda n: (-accuracy[n], n))
    return {"rounds": len(steps), "same_choice_fraction": same / max(len(steps), 1),
            "measured_trial_fraction": measured / max(offered, 1)}


def part_agreement(args) -> dict:
    from lightning_prune.datamodules import DigitsDataModule

    data = DigitsDataModule(image_size=16, batch_size=64, seed=0, val_fraction=args.val_fraction)
    data.setup("fit")
    data.setup("test")
    train, test = data.train_dataloader(), data.test_dataloader()
    val = list(data.val_dataloader())
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        dense = create_model(name, num_classes=10, in_channels=1)
        _train(dense, train, epochs=args.epochs, lr=0.05, seed=0)
        row = {"dense_test_acc": _accuracy(dense, test), "val_images": sum(len(y) for _, y in val)}
        smaller_val = [(x[:-8], y[:-8]) for x, y in val]  # a perturbed split (16 images fewer): the noise reference
        fast_options = {"mode": "fast", **json.loads(args.fast_options)}
        for label, split, options in (("exact", val, {}), ("fast", val, fast_options),
                                      ("exact_perturbed_split", smaller_val, {})):
            model = copy.deepcopy(dense)
            evaluator = AccuracyEvaluator(model, split)
            graph = DependencyGraph(model, torch.zeros(2, 1, 16, 16))
            from lightning_prune.criteria import get
            from lightning_prune.pruning import prune_event

            start = time.perf_counter()
            report = prune_event(graph, get("l1"), TARGET, target_kind="flops", allocation="sensitivity",
                                 evaluate=evaluator, sensitivity={"progress": False, **options}, source="benchmark")
            wall = time.perf_counter() - start
            pruned_acc = _accuracy(model, test)
            tuned = []
            for seed in (0, 1):
                copy_ = copy.deepcopy(model)
                _train(copy_, train, epochs=args.finetune_epochs, lr=0.02, seed=seed)
                tuned.append(_accuracy(copy_, test))
            if label == "exact":
                lazy = lazy_along_exact(report.sensitivity_steps, evaluator.total)
            row[label] = {"widths": report.widths_after, "images": evaluator.images, "wall_s": wall,
                          "rounds": len(report.sensitivity_steps), "reduction": report.flops_reduction,
                          "test_acc_pruned": pruned_acc, "test_acc_finetuned": tuned,
                          "forward_equivalents": evaluator.forward_equivalents,
                          **({"lazy_along_exact": lazy} if label == "exact" else {})}
            print(name, label, json.dumps({k: v for k, v in row[label].items() if k != "widths"}), flush=True)
        row["fast_vs_exact"] = agreement(row["fast"]["widths"], row["exact"]["widths"])
        row["lazy_along_exact"] = row["exact"].pop("lazy_along_exact")
        row["perturbed_vs_exact"] = agreement(row["exact_perturbed_split"]["widths"], row["exact"]["widths"])
        results[name] = row
        print(name, row["fast_vs_exact"], row["perturbed_vs_exact"], row["lazy_along_exact"], flush=True)
        dump("agreement", results)
    return results


# -- output ------------------------------------------------------------------------------------------------------
def dump(part: str, results: dict) -> None:
    payload = {"machine": machine_description(THREADS), "load_average": os.getloadavg(), "argv": sys.argv[1:],
               "results": results}
    write_results(OUT / f"sensitivity_scale_{part}{TAG}.json", json.dumps(payload, indent=1, default=str))


PARTS = {"scale": (part_scale, ["resnet20", "resnet56"]),
         "cost": (part_cost, ["resnet20", "resnet56", "resnet110", "resnet18@64", "resnet50@224"]),
         "ddp": (part_ddp, ["resnet20"]), "agreement": (part_agreement, ["resnet20", "resnet56"]),
         "replay": (part_replay, ["resnet50@224", "resnet20", "resnet56"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--epochs", type=int, default=5, help="agreement: dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="agreement: fine-tune epochs")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="agreement: digits validation fraction")
    parser.add_argument("--fast-options", default="{}", help="agreement: JSON options added to mode='fast'")
    parser.add_argument("--tag", default="", help="suffix of the results file (sensitivity_scale_<part><tag>.json)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    global TAG
    TAG = args.tag
    function, models = PARTS[args.part]
    args.models = args.models or models
    function(args)


if __name__ == "__main__":
    main()
