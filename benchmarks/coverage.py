"""Architecture coverage: prune every torchvision classification model with lightning-prune and with plain
Torch-Pruning, side by side.

For each model (``weights=None``, default ``num_classes``), at its native input size:

* **lightning-prune**: build a :class:`~lightning_prune.structure.DependencyGraph`, and for every channel group
  remove ``int(0.5 * size)`` channels (rounded down to a multiple of ``group.divisions``) with the lowest L2 filter
  norm, all in ONE ``prune_groups`` call; then run a forward pass in eval and in train mode.
* **Torch-Pruning**: ``MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[classifier], global_pruning=False).step()``, then the same forward checks.

fvcore FLOPs (one multiply-add = one flop) and parameter counts are measured before and after. Every
(model, tool) pair runs in its own subprocess with a hard wall-clock timeout and an address-space cap
(``RLIMIT_AS``), so a tracer that hangs or blows up memory (Swin, MaxViT) is recorded as ``timeout``/``memory``
instead of killing the run. Results are written as Markdown after every model, so a long run can be inspected
while it goes.

Usage::

    python benchmarks/coverage.py --models resnet18,swin_t --timeout 180 --out docs/benchmarks/coverage.md
    python benchmarks/coverage.py                      # all models (takes hours on a small CPU box)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

DEFAULT_OUT = "docs/benchmarks/coverage.md"
TOOLS = ("ours", "tp")
#: ``--zoo timm`` (issue 15): CNNs across timm's families, built with ``timm.create_model(name, pretrained=False)``
#: and pruned at 96x96 (``TIMM_SIZE``); each name is prefixed ``timm/`` in the results.
TIMM_ZOO = (
    "resnet18 resnet50d seresnet50 ecaresnet26t resnest26d res2net50_26w_4s res2next50 skresnet18 dpn68 "
    "cspresnet50 cspdarknet53 cspresnext50 darknet53 densenet121 dla34 dla46_c regnetx_002 regnety_002 "
    "efficientnet_b0 efficientnet_lite0 tf_efficientnet_b0 mixnet_s tf_mixnet_s mobilenetv2_100 "
    "mobilenetv3_large_100 mobilenetv3_small_050 lcnet_050 ghostnet_100 ghostnetv2_100 hrnet_w18_small rexnet_100 "
    "fbnetc_100 mnasnet_100 spnasnet_100 semnasnet_100 tinynet_a ese_vovnet19b_dw selecsls42b resnetv2_50 "
    "efficientformer_l1 fastvit_t8 convnext_atto repvgg_a0 hardcorenas_a gernet_s").split()
TIMM_SIZE = 96


# ====================================================================================================================
# Worker side: one (model, tool) per process.
# ====================================================================================================================
def _input_size(name: str, model: Any) -> int:
    """The model's native input size: its ``image_size`` attribute when it has one (ViT), 299 for
    Inception v3, otherwise 224."""
    if name.startswith("timm/"):
        return TIMM_SIZE
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return size
    if name == "inception_v3":
        return 299
    return 224


def _build_model(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name[len("timm/"):], pretrained=False).eval()
    model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def _classifiers(model: Any, num_classes: int = 1000) -> list:
    """Layers whose outputs are class logits (the final classifier, and auxiliary heads' classifiers)."""
    from torch import nn

    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    found += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if not found:
        found = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return found


def _forward_check(model: Any, x: Any) -> str:
    """``ok`` when the model runs in eval mode (batch 1) and in train mode (batch 2), else what failed."""
    import torch

    failed = []
    with torch.no_grad():
        for mode, batch in (("eval", x), ("train", torch.cat([x, x]))):
            model.train(mode == "train")
            try:
                model(batch)
            except Exception as error:  # noqa: BLE001 - recorded, not handled
                failed.append(f"{mode}: {type(error).__name__}: {_first_line(error)[:110]}")
    model.eval()
    return "ok" if not failed else "; ".join(failed)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return line[:160]


def _is_memory_error(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return "can't allocate memory" in text or "out of memory" in text or "cannot allocate memory" in text


def _run_worker(name: str, tool: str, result_path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    result: dict[str, Any] = {"model": name, "tool": tool, "stage": "start"}

    def save(**update: Any) -> None:
        result.update(update)
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, result_path)

    try:
        from lightning_prune.structure import count_flops, count_params

        save(stage="build model")
        model = _build_model(name)
        size = _input_size(name, model)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        save(input_size=size, params_before=count_params(model))
        if tool == "ours":
            save(stage="count FLOPs before")
            save(flops_before=count_flops(model, x))
            _prune_ours(model, x, save)
        else:
            _prune_tp(model, x, save)
        save(stage="forward check", params_after=count_params(model))
        save(forward=_forward_check(model, x))
        if result["forward"] != "ok":  # pruned without an error, but the pruned model does not run
            save(stage="done", status="broken", error=f"pruned model fails: {result['forward']}")
            return
        save(stage="count FLOPs after")
        save(flops_after=count_flops(model, x))
        save(stage="done", status="ok")
    except BaseException as error:  # noqa: BLE001 - recorded in the result file
        save(
            status="memory" if _is_memory_error(error) else "error",
            error=f"{type(error).__name__}: {_first_line(error)}",
            traceback=traceback.format_exc(limit=6)[-2000:],
        )


def _prune_ours(model: Any, x: Any, save: Any) -> None:
    from lightning_prune import criteria
    from lightning_prune.errors import PruningError
    from lightning_prune.pruning import exclude_breaking_groups
    from lightning_prune.structure import DependencyGraph

    save(stage="build graph")
    start = time.perf_counter()
    graph = DependencyGraph(model, x)
    groups = graph.groups
    save(
        build_s=time.perf_counter() - start,
        groups=len(groups),
        frozen_ops=len(graph.frozen_ops),
        unmappable=len(getattr(graph, "unmappable", {})),
    )
    save(stage="score + prune")
    start = time.perf_counter()
    l2 = criteria.get("l2")
    while True:
        removals = {}
        for group in graph.groups:
            n = int(0.5 * group.size) // group.divisions * group.divisions
            if n > 0:
                removals[group.name] = group.lowest(l2.score(group), n)
        try:
            graph.prune_groups(removals)
            break
        except PruningError:
            # What prune() and PruneCallback do: find the groups whose removal breaks the model, leave them
            # unpruned, prune the rest.
            if not exclude_breaking_groups(graph, removals):
                raise
    save(prune_s=time.perf_counter() - start, channel_sparsity=graph.channel_sparsity(), pruned_groups=len(removals),
         excluded=len(graph.excluded))


def _prune_tp(model: Any, x: Any, save: Any) -> None:
    import torch_pruning as tp

    save(stage="build graph")
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=_classifiers(model),
        global_pruning=False,
    )
    save(build_s=time.perf_counter() - start, stage="prune")
    start = time.perf_counter()
    pruner.step()
    save(prune_s=time.perf_counter() - start)


# ====================================================================================================================
# Driver side.
# ====================================================================================================================
def _limit_memory(gib: float) -> Any:
    def apply() -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_one(name: str, tool: str, timeout: float, memory_gib: float, threads: int) -> dict[str, Any]:
    """Run one (model, tool) in a fresh process under a hard timeout and memory cap."""
    with tempfile.TemporaryDirectory(prefix="lp-coverage-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--models", name,
                   "--result", result_path, "--threads", str(threads)]
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=_limit_memory(memory_gib) if memory_gib else None, start_new_session=True,
        )
        timed_out = False
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
        wall = time.perf_counter() - start
        result: dict[str, Any] = {"model": name, "tool": tool}
        if os.path.exists(result_path):
            with open(result_path) as f:
                result.update(json.load(f))
        result["wall_s"] = wall
        if timed_out:
            result["status"] = "timeout"
            result["error"] = f"killed after {timeout:g} s during {result.get('stage', 'startup')}"
        elif "status" not in result:
            code = process.returncode
            tail = (stderr or "").strip().splitlines()[-1:] or [""]
            if code is not None and code < 0:
                sig = signal.Signals(-code).name
                result["status"] = "memory" if -code == signal.SIGKILL else "crash"
                result["error"] = f"killed by {sig} during {result.get('stage', 'startup')}"
            elif _is_memory_error(Exception(tail[0])):
                result["status"] = "memory"
                result["error"] = tail[0][:160]
            else:
                result["status"] = "crash"
                result["error"] = f"exit code {code} during {result.get('stage', 'startup')}: {tail[0][:120]}"
        return result


def _fmt_g(flops: Any) -> str:
    return f"{flops / 1e9:.2f}" if isinstance(flops, (int, float)) else "–"


def _fmt_m(params: Any) -> str:
    return f"{params / 1e6:.1f}" if isinstance(params, (int, float)) else "–"


def _fmt_s(seconds: Any) -> str:
    return f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "–"


def _ratio(after: Any, before: Any) -> str:
    if isinstance(after, (int, float)) and isinstance(before, (int, float)) and before:
        return f" ({100 * after / before:.0f}%)"
    return ""


def _status(result: dict[str, Any] | None) -> str:
    if result is None:
        return "pending"
    status = result.get("status", "?")
    if status == "ok":
        return "ok"
    if status == "broken":
        return "**broken** (see fwd)"
    return f"**{status}**: {_escape(result.get('error', ''))}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _total_s(result: dict[str, Any] | None) -> Any:
    if not result:
        return None
    parts = [result.get("build_s"), result.get("prune_s")]
    numbers = [p for p in parts if isinstance(p, (int, float))]
    return sum(numbers) if numbers else None


def machine_description() -> list[str]:
    import torch
    import torch_pruning
    import torchvision
    from fvcore import __version__ as fvcore_version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model_names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if model_names:
            cpu = model_names[0]
    except OSError:
        pass
    return [
        f"- Platform: `{platform.platform()}`, Python {platform.python_version()}",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible (shared machine; workers use "
        f"{{threads}} torch thread(s)), no GPU",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, torch_pruning "
        f"{getattr(torch_pruning, '__version__', '?')}, fvcore {fvcore_version}",
    ]


def write_markdown(path: Path, models: list[str], results: dict[tuple[str, str], dict], args: Any,
                   started: str, finished: bool) -> None:
    lines = [
        "# Architecture coverage: " + ("timm CNNs (issue 15)" if args.zoo == "timm" else
                                        "torchvision classification models"),
        "",
        "Generated by `benchmarks/coverage.py` "
        f"(`--zoo {args.zoo} --timeout {args.timeout:g} --memory-gb {args.memory_gb:g} --jobs {args.jobs}`), "
        f"started {started}"
        + ("." if finished else "; **run in progress** (partial results)."),
        "",
        "Each model is built with `weights=None` and pruned at 50% of the channels of every group, layerwise, by "
        + ("L2 filter norm, at 96x96 (`timm.create_model(name, pretrained=False)`). " if args.zoo == "timm" else
           "L2 filter norm, at its native input size (224, 299 for Inception v3, the model's `image_size` for ViT). ")
        +
        "**lightning-prune**: `DependencyGraph` + one `prune_groups` call removing `int(0.5·size)` channels per "
        "group (rounded down to a multiple of `group.divisions`), then forward in eval and train mode. "
        "**Torch-Pruning**: `MetaPruner(..., MagnitudeImportance(p=2), pruning_ratio=0.5, "
        "ignored_layers=[classifier], global_pruning=False).step()`, same forward checks. FLOPs are fvcore counts "
        "for one image (1 multiply-add = 1 flop), in G; params in M; times are wall seconds (graph build + "
        "pruning) on the machine below. Each (model, tool) runs in its own process with a hard timeout and an "
        "address-space cap; `timeout`/`memory` mean the process was stopped.",
        "",
        "## Machine",
        "",
        *[line.replace("{threads}", str(args.threads)) for line in machine_description()],
        "",
        "## Summary",
        "",
    ]
    done = [m for m in models if (m, "ours") in results and (m, "tp") in results]
    counts: dict[str, dict[str, int]] = {tool: {} for tool in TOOLS}
    for m in done:
        for tool in TOOLS:
            status = results[(m, tool)].get("status", "?")
            counts[tool][status] = counts[tool].get(status, 0) + 1
    ok = {tool: {m for m in done if results[(m, tool)].get("status") == "ok"} for tool in TOOLS}

    def tally(tool: str) -> str:
        others = ", ".join(f"{k}: {v}" for k, v in sorted(counts[tool].items()) if k != "ok")
        text = f"{len(ok[tool])} of {len(done)} pruned and run in train and eval mode"
        return text + (f" ({others})" if others else "")

    lines += [
        f"- Models: {len(done)} of {len(models)} finished.",
        f"- lightning-prune: {tally('ours')}.",
        f"- Torch-Pruning: {tally('tp')}.",
        f"- Both succeed: {len(ok['ours'] & ok['tp'])}; only lightning-prune: "
        f"{', '.join(f'`{m}`' for m in sorted(ok['ours'] - ok['tp'])) or '–'}; only Torch-Pruning: "
        f"{', '.join(f'`{m}`' for m in sorted(ok['tp'] - ok['ours'])) or '–'}; neither: "
        f"{', '.join(f'`{m}`' for m in done if m not in ok['ours'] | ok['tp']) or '–'}.",
        "- Statuses: `error` = an exception while tracing/pruning (lightning-prune restores the model); `broken` = "
        "pruning returned but the pruned model fails a forward pass; `timeout`/`memory` = the worker was stopped "
        "by the hard bound.",
        "",
        "## Results",
        "",
        "| model | input | ours | groups | ours s | ours fwd train/eval | params M before → after | "
        "FLOPs G before → after | TP | TP s | TP params M after | TP FLOPs G after | TP fwd train/eval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        ours, tp_ = results.get((m, "ours")), results.get((m, "tp"))
        if ours is None and tp_ is None:
            continue
        o, t = ours or {}, tp_ or {}
        before_f = o.get("flops_before")
        before_p = o.get("params_before", t.get("params_before"))
        lines.append(
            "| " + " | ".join([
                f"`{m}`",
                str(o.get("input_size", t.get("input_size", "–"))),
                _status(ours),
                str(o.get("groups", "–")) + (f" ({o['excluded']} left unpruned)" if o.get("excluded") else ""),
                _fmt_s(_total_s(ours)),
                _escape(o.get("forward", "–")),
                f"{_fmt_m(before_p)} → {_fmt_m(o.get('params_after'))}{_ratio(o.get('params_after'), before_p)}",
                f"{_fmt_g(before_f)} → {_fmt_g(o.get('flops_after'))}{_ratio(o.get('flops_after'), before_f)}",
                _status(tp_),
                _fmt_s(_total_s(tp_)),
                f"{_fmt_m(t.get('params_after'))}{_ratio(t.get('params_after'), before_p)}",
                f"{_fmt_g(t.get('flops_after'))}{_ratio(t.get('flops_after'), before_f)}",
                _escape(t.get("forward", "–")),
            ]) + " |"
        )
    lines += [
        "",
        "`ours s`/`TP s`: graph build + scoring + pruning (for lightning-prune this includes the validation forward "
        "passes `prune_groups` makes before returning). Percentages are relative to the unpruned model. "
        "\"left unpruned\": groups whose removal broke the model (found by `DependencyGraph.find_unprunable` after "
        "the first surgery failed, as `prune()` and `PruneCallback` do); the other groups were pruned.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated model names of the zoo (default: all)")
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision",
                        help="torchvision: every classification model; timm: TIMM_ZOO at 96x96 (needs timm)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model and tool (default 300)")
    parser.add_argument("--memory-gb", type=float, default=12.0, help="address-space cap per worker, GiB (0: none)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"Markdown output (default {DEFAULT_OUT})")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--render", action="store_true", help="only re-write --out from the results in --json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --json and run only the models missing there")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _run_worker(args.models, args.worker, args.result, args.threads)
        return 0

    import torchvision

    if args.zoo == "timm":
        available = [f"timm/{name}" for name in TIMM_ZOO]
        args.models = ",".join(m if m.startswith("timm/") else f"timm/{m}" for m in args.models.split(",") if m.strip())
    else:
        available = torchvision.models.list_models(module=torchvision.models)
    models = [m.strip() for m in args.models.split(",") if m.strip()] or available
    unknown = [m for m in models if m not in available]
    if unknown:
        parser.error(f"--models: unknown {unknown}; accepted values: {', '.join(available)}")
    if args.jobs < 1 or args.timeout <= 0:
        parser.error("--jobs must be >= 1 and --timeout > 0")

    out = Path(args.out)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results: dict[tuple[str, str], dict] = {}
    if args.render:
        if not args.json:
            parser.error("--render needs --json (the raw results of an earlier run)")
        for entry in json.loads(Path(args.json).read_text()):
            results[(entry["model"], entry["tool"])] = entry
        write_markdown(out, models, results, args, started, finished=True)
        return 0

    if args.resume and args.json and Path(args.json).exists():
        for entry in json.loads(Path(args.json).read_text()):
            results[(entry["model"], entry["tool"])] = entry
    pending = [m for m in models if not all((m, tool) in results for tool in TOOLS)]

    def one_model(name: str) -> str:
        for tool in TOOLS:
            results[(name, tool)] = run_one(name, tool, args.timeout, args.memory_gb, args.threads)
        o, t = results[(name, "ours")], results[(name, "tp")]
        return (f"{name}: ours={o.get('status')} ({_fmt_s(o.get('wall_s'))} s, fwd={o.get('forward', '-')}) "
                f"tp={t.get('status')} ({_fmt_s(t.get('wall_s'))} s, fwd={t.get('forward', '-')})"
                + (f" | ours error: {o.get('error')}" if o.get("status") != "ok" else "")
                + (f" | tp error: {t.get('error')}" if t.get("status") != "ok" else ""))

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one_model, m): m for m in pending}
        for future in concurrent.futures.as_completed(futures):
            print(future.result(), flush=True)
            write_markdown(out, models, results, args, started, finished=False)
            if args.json:
                Path(args.json).write_text(json.dumps([results[k] for k in sorted(results)], indent=1))
    write_markdown(out, models, results, args, started, finished=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
