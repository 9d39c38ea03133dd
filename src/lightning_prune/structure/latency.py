"""Latency, measured on the user's hardware, and a per-layer latency lookup table that predicts it for any widths.

:func:`measure_latency` times a model the way it will be deployed: eval mode, ``torch.inference_mode``, on the
inputs' device (CUDA synchronized), under autocast when a ``dtype`` is given on CUDA, warm-up passes, then the
median of ``rounds`` timed passes; the model's train/eval flags are restored.

:class:`LatencyModel` is the latency analogue of :class:`~lightning_prune.structure.FlopsModel`. One forward pass
with hooks captures every prunable layer's real input shape (convolutions, linears, normalizations, and the
elementwise/pooling modules that run on a group's channels); each distinct layer is then timed *in isolation* at a
grid of (input width, output width) fractions and the whole-model latency at any widths is predicted as

    predicted_ms(widths) = dense_ms x sum_l t_l(widths) / sum_l t_l(dense widths)

with ``t_l`` interpolated bilinearly in the table. Ops outside modules (residual adds, functional activations)
are assumed to shrink like the timed layers; the allocation corrects what the table gets wrong by measuring
(:mod:`lightning_prune.allocation.latency`). Tables are cached on disk, keyed by device, torch version, model
structure, input shape and dtype.

On CPU a warm forward pass can still map fresh memory: glibc's malloc hands large activation buffers back to the
OS and maps them again, how often depending on its history, so latency moves with the allocator's state
(:func:`page_faults_per_forward` counts it, :data:`FAULTS_WARNING` says when it matters).

For ``round_to="auto"`` the table also times, per group, the heaviest layer writing it and the heaviest layer
reading it at widths ``w - d`` for ``d`` in :data:`STEP_OFFSETS` below an aligned width ``w`` (``steps``);
:func:`step_from_timings` reads from them the width step the kernels favour (see there).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .flops import module_groups
from .tracing import call_model, preserved_state

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
TABLE_VERSION = 2
#: channel offsets below an aligned width at which each group's heaviest layers are timed for ``round_to="auto"``
STEP_OFFSETS = (0, 1, 2, 4, 8, 12, 16)
#: the width steps ``round_to="auto"`` can read from those timings, widest first
STEP_CANDIDATES = (16, 8, 4)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Sigmoid,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout)
_TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) + _ELEMENTWISE


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_PRUNE_CACHE", Path.home() / ".cache" / "lightning-prune")) / "latency"


def _first_device(inputs: Any) -> torch.device:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:threads={torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def time_calls(fn, device: torch.device, *, warmup: int, rounds: int, min_sample_ms: float = 0.0) -> float:
    """Median milliseconds of one ``fn()`` call. With ``min_sample_ms``, each timed sample repeats ``fn`` enough
    times to last that long (short layers are otherwise below the clock's resolution and noise)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    repeat = 1
    if min_sample_ms > 0:
        start = time.perf_counter()
        fn()
        _sync(device)
        once = (time.perf_counter() - start) * 1e3
        repeat = max(1, min(1000, int(min_sample_ms / max(once, 1e-3))))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3 / repeat)
    return float(statistics.median(samples))


def measure_latency(model: nn.Module, inputs: Any, dtype: torch.dtype | None = None, *, warmup: int = 3,
                    rounds: int = 10) -> float:
    """Median milliseconds of one forward pass of ``model`` on ``inputs`` (eval mode, ``torch.inference_mode``,
    on the inputs' device, CUDA synchronized, autocast to ``dtype`` on CUDA). The model's train/eval flags,
    buffers and RNG are restored afterwards."""
    device = _first_device(inputs)
    with preserved_state(model), torch.inference_mode(), _autocast(device, dtype if device.type == "cuda" else None):
        model.eval()
        return time_calls(lambda: call_model(model, inputs), device, warmup=warmup, rounds=rounds)


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None where the OS does not count them, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_faults_per_forward(model: nn.Module, inputs: Any, *, warmup: int = 3, rounds: int = 3) -> float | None:
    """Median minor page faults of one warm forward pass of ``model`` on CPU ``inputs`` (eval mode,
    ``inference_mode``); None on other devices or where the OS does not count them. A warm pass that faults maps
    fresh memory for its activations: glibc's malloc gives allocations above its (moving) mmap threshold back to the
    OS when they are freed, so the next pass maps and zeroes them again (see :data:`FAULTS_WARNING`). [measured]
    Three warm-up passes: a heap that keeps freed memory still grows during the first passes (torchvision
    ResNet-50 at batch 8, 224^2, with MALLOC_MMAP_MAX_=0: 30,016, 12,544, 1,568, then 0 faults per pass; with
    the default malloc 30,000-60,000 on every pass)."""
    if _first_device(inputs).type != "cpu" or minor_page_faults() is None:
        return None
    counts = []
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for _ in range(warmup):
            call_model(model, inputs)
        for _ in range(rounds):
            before = minor_page_faults()
            call_model(model, inputs)
            counts.append(minor_page_faults() - before)
    return float(statistics.median(counts))


#: [measured] page faults per warm forward pass above which a CPU latency measurement depends on the allocator's
#: state: dense MobileNetV2 at batch 8, 224^2 faulted 12,900-39,000 times per pass (the count moving between passes
#: and processes) and its latency ratio to a pruned copy moved 0.674-0.842 across four processes; with
#: MALLOC_MMAP_MAX_=0 and a high MALLOC_TRIM_THRESHOLD_ it faulted 0 times and the ratio stayed within 0.682-0.722
#: (benchmarks/allocator_faults.py, docs/benchmarks.md section 7). 1024 pages = 4 MiB per pass.
FAULTS_WARNING = 1024

#: glibc settings under which a warm forward pass maps nothing anew (large blocks served from the heap, freed memory
#: kept for reuse): the remedy the warning gives, set in the process's environment before Python starts.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def allocator_advice(faults: float) -> str:
    """The warning for a model whose warm forward pass page-faults ``faults`` times."""
    return (f"latency_reduction: each forward pass of the model at latency_input page-faults about {faults:,.0f} "
            f"times on CPU (about {faults * 4096 / 2 ** 20:,.0f} MiB of memory mapped anew per pass): the C "
            "library's malloc returns large activation buffers to the OS and maps them again, how often depends on "
            "the allocator's history, and the measured latency (and so the latency target) can move between "
            "processes by more than the target's 5 % tolerance (MobileNetV2 on the development machine: its "
            "latency ratio to a pruned copy moved between 0.67 and 0.84 across four processes). For a stable "
            f"latency target, start Python with {' '.join(f'{k}={v}' for k, v in KEEP_FREED_MEMORY.items())} (glibc "
            "then keeps freed memory for reuse: 0 page faults per pass there; see the README's latency section).")


def measure_ratio(first: nn.Module, second: nn.Module, inputs: Any, dtype: torch.dtype | None = None, *,
                  warmup: int = 3, rounds: int = 20, placements: int = 1) -> tuple[float, float]:
    """Median ms of ``first`` and ``second``, timed alternately (a, b, b, a, ...) so that a machine's changing load
    falls on both alike: their ratio is robust where absolute times are not. ``placements``: see
    :func:`interleaved_times`."""
    times = interleaved_times(first, second, inputs, dtype, warmup=warmup, rounds=rounds, placements=placements)
    return float(statistics.median(times[0])), float(statistics.median(times[1]))


def detached_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` in eval mode, without a LightningModule's trainer; None if it cannot be copied."""
    import copy

    trainer = getattr(model, "_trainer", None)
    try:
        if trainer is not None:
            model._trainer = None
        return copy.deepcopy(model).eval()
    except Exception:  # noqa: BLE001 (an uncopyable model is timed as it is)
        return None
    finally:
        if trainer is not None:
            model._trainer = trainer


def placement_blocks(rounds: int, placements: int) -> list[int]:
    """How :func:`interleaved_times` splits ``rounds`` over ``placements`` blocks (the first blocks one longer)."""
    placements = max(1, min(placements, rounds))
    return [rounds // placements + (1 if b < rounds % placements else 0) for b in range(placements)]


def interleaved_times(first: nn.Module, second: nn.Module, inputs: Any, dtype: torch.dtype | None = None, *,
                      warmup: int = 3, rounds: int = 20, placements: int = 1) -> tuple[list[float], list[float]]:
    """Per-round ms of ``first`` and ``second`` timed alternately (a, b, b, a, ...): round ``r``'s two samples ran
    back to back, so ``second[r] / first[r]`` sees (nearly) the same machine load (see :func:`pair_ratio`).

    ``placements > 1`` splits the rounds into that many blocks (:func:`placement_blocks`) and times every block
    after the first on fresh deep copies of both models. [measured] On CPU a model's speed depends on where its
    weights happen to lie in memory, and the dependence persists for as long as the tensors live: on the 2-core
    Xeon of docs/benchmarks.md, one pruned MobileNetV2 timed against copies of its dense model gave ratios from
    0.66 to 0.92 (copies of the dense model against each other: 0.93-1.05), the same objects re-timed for a
    minute stayed within +-0.07 of their own mean. More rounds on the same tensors cannot average that out;
    more copies do."""
    device = _first_device(inputs)
    times: tuple[list[float], list[float]] = ([], [])
    blocks = placement_blocks(rounds, placements)
    r, pair = 0, (first, second)
    for block, block_rounds in enumerate(blocks):
        if block:  # copied while the previous block's pair still holds its memory, so the copies land elsewhere
            pair = (detached_copy(first) or first, detached_copy(second) or second)
        with preserved_state(pair[0]), preserved_state(pair[1]), torch.inference_mode(), \
                _autocast(device, dtype if device.type == "cuda" else None):
            pair[0].eval(), pair[1].eval()
            for model in pair:
                for _ in range(warmup if block == 0 else min(warmup, 1)):
                    call_model(model, inputs)
            for _ in range(block_rounds):
                for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                    _sync(device)
                    start = time.perf_counter()
                    call_model(pair[i], inputs)
                    _sync(device)
                    times[i].append((time.perf_counter() - start) * 1e3)
                r += 1
    return times


def pair_ratio(times: tuple[list[float], list[float]]) -> float:
    """Median over rounds of ``second / first`` from :func:`interleaved_times`. A load burst that slows one round
    slows both of its samples, so the per-round ratio drops it where the ratio of two medians would not."""
    return float(statistics.median(b / a for a, b in zip(*times) if a > 0))


def ratio_standard_error(times: tuple[list[float], list[float]]) -> float:
    """Standard error of :func:`pair_ratio`: the median's large-sample error, 1.2533 x sigma / sqrt(n), with sigma
    read robustly from the per-round ratios' median absolute deviation (one load burst does not inflate it)."""
    ratios = [b / a for a, b in zip(*times) if a > 0]
    if len(ratios) < 2:
        return float("inf")
    centre = statistics.median(ratios)
    mad = statistics.median(abs(r - centre) for r in ratios)
    return 1.2533 * 1.4826 * mad / len(ratios) ** 0.5


@dataclass
class PairTiming:
    """Interleaved per-round milliseconds of two models (:func:`interleaved_times`) and what they say."""

    first: list[float]
    second: list[float]
    #: rounds timed on each memory placement, in order (:func:`placement_blocks` of every call)
    blocks: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return pair_ratio((self.first, self.second))

    @property
    def standard_error(self) -> float:
        return ratio_standard_error((self.first, self.second))

    @property
    def rounds(self) -> int:
        return len(self.first)

    def placement_ratios(self) -> list[float]:
        """:func:`pair_ratio` of each placement's own rounds."""
        ratios, at = [], 0
        for size in self.blocks:
            ratios.append(pair_ratio((self.first[at:at + size], self.second[at:at + size])))
            at += size
        return ratios

    def extend(self, times: tuple[list[float], list[float]], blocks: list[int]) -> None:
        self.first += times[0]
        self.second += times[1]
        self.blocks += blocks


def time_pair(first: nn.Module, second: nn.Module, inputs: Any, dtype: torch.dtype | None = None, *,
              rounds: int = 20, placements: int = 1, precision: float | None = None, max_rounds: int = 0,
              goal: float | None = None, band: float = float("inf")) -> PairTiming:
    """Time ``second`` against ``first`` (:func:`interleaved_times`), then, while the ratio's standard error is
    above ``precision`` (a fraction of the ratio) and, with a ``goal``, the ratio lies within ``band`` (a fraction
    of the goal) of it, time ``rounds`` more on new placements, up to ``max_rounds`` in all. A ratio far from the
    goal decides alone; one near it is measured until it is precise or the rounds are spent."""
    blocks = placement_blocks(rounds, placements)
    timing = PairTiming(*interleaved_times(first, second, inputs, dtype, rounds=rounds, placements=placements),
                        blocks=list(blocks))
    while (precision is not None and timing.rounds + rounds <= max_rounds
           and timing.standard_error > precision * timing.ratio
           and (goal is None or abs(timing.ratio - goal) <= band * goal)):
        timing.extend(interleaved_times(first, second, inputs, dtype, warmup=1, rounds=rounds,
                                        placements=placements), blocks)
    return timing


# -- the lookup table ---------------------------------------------------------------------------------------------
def _layer_config(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {"kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "in": module.in_channels, "out": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"bias": module.bias is not None, "in": module.in_features, "out": module.out_features}
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return {"features": module.num_features}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(module).items()
            if k in ("kernel_size", "stride", "padding", "output_size", "ceil_mode", "negative_slope")}


def _build_layer(kind: str, config: Mapping[str, Any], in_w: int, out_w: int) -> nn.Module:
    """A fresh module like the original one, at ``in_w`` input and ``out_w`` output channels."""
    cls = getattr(nn, kind)
    if kind.startswith("Conv"):
        groups = config["groups"]
        if groups > 1 and groups == config["in"] == config["out"]:  # depthwise: one filter per channel
            groups, out_w = in_w, in_w
        padding = config["padding"] if isinstance(config["padding"], str) else tuple(config["padding"])
        return cls(in_w, out_w, tuple(config["kernel_size"]), stride=tuple(config["stride"]), padding=padding,
                   dilation=tuple(config["dilation"]), groups=groups, bias=config["bias"])
    if kind == "Linear":
        return cls(in_w, out_w, bias=config["bias"])
    if kind.startswith("BatchNorm"):
        return cls(out_w)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return cls(**kwargs)


def _interp(points: list[int], x: float) -> tuple[int, int, float]:
    """Indices ``(i, j)`` of the grid points around ``x`` and the weight of ``j`` (constant below the grid)."""
    if len(points) == 1:
        return 0, 0, 0.0
    if x <= points[0]:  # below the grid: no further saving is predicted (conservative)
        return 0, 0, 0.0
    j = min(max(bisect.bisect_left(points, x), 1), len(points) - 1)
    i = j - 1
    return i, j, (x - points[i]) / (points[j] - points[i]) if points[j] != points[i] else 0.0


class LatencyModel:
    """Per-layer latency lookup table of one model on one device, input shape and dtype (see the module doc).

    ``entries[module name] = {"kind", "config", "in_group", "out_group", "in_points", "out_points", "ms"}`` where
    ``ms[i][j]`` is the layer's time at ``in_points[i]`` input and ``out_points[j]`` output channels (absolute
    widths, so the table keeps predicting after the model was pruned). Plain data: :meth:`to_dict` /
    :meth:`from_dict` (checkpoints, DDP broadcast, the disk cache)."""

    def __init__(self, entries: dict[str, dict[str, Any]], dense_ms: float, dense_widths: Mapping[str, int],
                 key: str = "", build_s: float = 0.0, timings: int = 0,
                 steps: Mapping[str, Mapping[str, Any]] | None = None):
        self.entries, self.dense_ms, self.key = entries, float(dense_ms), key
        #: per group: ``{"widths": [...], "ms": [...], "layers": [...]}``, the step probes (see the module doc)
        self.steps = dict(steps or {})
        self.dense_widths = dict(dense_widths)
        self.build_s, self.timings = build_s, timings
        self.by_group: dict[str, list[str]] = {}
        for name, e in entries.items():
            for g in {e["in_group"], e["out_group"]} - {None}:
                self.by_group.setdefault(g, []).append(name)
        self.dense_sum = self.layers_ms(self.dense_widths)

    # -- prediction --------------------------------------------------------------------------------------------
    def layer_ms(self, name: str, widths: Mapping[str, int]) -> float:
        e = self.entries[name]
        x = widths.get(e["in_group"], e["in_points"][-1]) if e["in_group"] else e["in_points"][-1]
        y = widths.get(e["out_group"], e["out_points"][-1]) if e["out_group"] else e["out_points"][-1]
        i0, i1, a = _interp(e["in_points"], x)
        j0, j1, b = _interp(e["out_points"], y)
        ms = e["ms"]
        value = ((1 - a) * ((1 - b) * ms[i0][j0] + b * ms[i0][j1]) + a * ((1 - b) * ms[i1][j0] + b * ms[i1][j1]))
        return max(value, 0.0)

    def layers_ms(self, widths: Mapping[str, int]) -> float:
        return sum(self.layer_ms(name, widths) for name in self.entries)

    def predict(self, widths: Mapping[str, int]) -> float:
        """Predicted whole-model milliseconds at ``widths`` (groups not given keep their dense width)."""
        full = {**self.dense_widths, **widths}
        return self.dense_ms * self.layers_ms(full) / self.dense_sum if self.dense_sum > 0 else self.dense_ms

    def group_ms(self, group: str, widths: Mapping[str, int]) -> float:
        """Summed table time of the layers whose width depends on ``group`` (for greedy deltas)."""
        return sum(self.layer_ms(name, widths) for name in self.by_group.get(group, ()))

    def scale(self) -> float:
        """Whole-model milliseconds per table millisecond."""
        return self.dense_ms / self.dense_sum if self.dense_sum > 0 else 1.0

    def step(self, group: str) -> int | None:
        """The width step the measured kernels favour for ``group`` (:func:`step_from_timings` on its probes);
        None where the table has no probes for it or they show no evidence."""
        probe = self.steps.get(group)
        if not probe:
            return None
        return step_from_timings(probe["offsets"], probe["ms"])

    # -- plain data --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "key": self.key, "dense_ms": self.dense_ms,
                "dense_widths": dict(self.dense_widths), "entries": self.entries, "build_s": self.build_s,
                "timings": self.timings, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyModel":
        # A version-1 table (no "steps") still predicts; round_to="auto" then falls back to the fixed rule.
        return cls(dict(data["entries"]), data["dense_ms"], data["dense_widths"], key=data.get("key", ""),
                   build_s=data.get("build_s", 0.0), timings=data.get("timings", 0), steps=data.get("steps"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, graph: Any, inputs: Any, dtype: torch.dtype | None = None, *, grid: Iterable[float] = GRID,
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True, warmup: int = 2, rounds: int = 5,
              min_sample_ms: float = 2.0, dense_rounds: int = 10) -> "LatencyModel":
        """Capture every layer's input shape in one forward pass, time each distinct layer at the ``grid`` of
        width fractions, measure the dense model; read from / write to the disk cache when ``use_cache``."""
        model = graph.model
        device = _first_device(inputs)
        grid = tuple(sorted(set(float(f) for f in grid) | {1.0}))
        layers = _capture_layers(graph, inputs)
        widths = graph.widths()
        key = _cache_key(model, device, inputs, dtype, grid, widths)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        file = path / f"{key}.json"
        if use_cache and file.is_file():
            try:
                table = cls.from_dict(json.loads(file.read_text()))
                table.cached = True
                return table
            except (ValueError, KeyError, OSError):
                pass  # a corrupt or foreign file: rebuild
        start = time.perf_counter()
        timed: dict[tuple, float] = {}
        entries = {}
        with torch.inference_mode(), _autocast(device, dtype if device.type == "cuda" else None):
            for name, layer in layers.items():
                in_points = sorted({max(1, round(f * layer["in_size"])) for f in grid}) if layer["in_group"] \
                    else [layer["in_size"]]
                out_points = sorted({max(1, round(f * layer["out_size"])) for f in grid}) if layer["out_group"] \
                    else [layer["out_size"]]
                ms = [[_time_layer(layer, i, o, device, timed, warmup, rounds, min_sample_ms) for o in out_points]
                      for i in in_points]
                entries[name] = {"kind": layer["kind"], "config": layer["config"], "in_group": layer["in_group"],
                                 "out_group": layer["out_group"], "in_points": in_points, "out_points": out_points,
                                 "shape": layer["shape"], "ms": ms}
            # More rounds than the grid: the probes compare widths a few channels apart.
            steps = _probe_steps(layers, entries, device, timed, warmup, 2 * rounds, min_sample_ms)
        dense_ms = measure_latency(model, inputs, dtype, rounds=dense_rounds)
        table = cls(entries, dense_ms, widths, key=key, build_s=time.perf_counter() - start, timings=len(timed),
                    steps=steps)
        table.cached = False
        if use_cache:
            try:
                path.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(".tmp")
                tmp.write_text(json.dumps(table.to_dict()))
                tmp.replace(file)
            except OSError:
                pass  # a read-only home: the table still works, it is just not cached
        return table


def _cache_key(model: nn.Module, device: torch.device, inputs: Any, dtype: torch.dtype | None,
               grid: tuple[float, ...], widths: Mapping[str, int]) -> str:
    structure = [(name, type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)])
                 for name, m in model.named_modules()]
    shapes = [tuple(t.shape) + (str(t.dtype),) for t in _tensors(inputs)]
    payload = json.dumps([TABLE_VERSION, device_name(device), torch.__version__, structure, shapes, str(dtype),
                          grid, sorted(widths.items())], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []
    return [v for v in values if isinstance(v, torch.Tensor)]


def _capture_layers(graph: Any, inputs: Any) -> dict[str, dict[str, Any]]:
    """Every timed layer's kind, configuration, input shape and the groups of its input/output channels.

    Convs/linears/norms get their groups from the graph's members; an elementwise or pooling module takes the
    group of the tensor it reads (followed by tensor identity through one forward pass)."""
    model = graph.model
    out_group, in_group = module_groups(graph)
    tensor_group: dict[int, str] = {}
    layers: dict[str, dict[str, Any]] = {}
    handles = []

    def hook(name: str, module: nn.Module):
        def run(mod, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            if isinstance(mod, _ELEMENTWISE):
                g = tensor_group.get(x.data_ptr())
                if g is None:
                    return
                ig = og = g
            else:
                ig, og = in_group.get(name), out_group.get(name)
                if ig is None and og is None:
                    return
            if isinstance(output, torch.Tensor) and og is not None:
                tensor_group[output.data_ptr()] = og
            channels_in = x.shape[1] if not isinstance(mod, nn.Linear) else x.shape[-1]
            channels_out = output.shape[1] if not isinstance(mod, nn.Linear) else output.shape[-1]
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or isinstance(mod, _ELEMENTWISE):
                ig = og  # one width: the group of the channels they carry
            key = name if name not in layers else f"{name}#{sum(k.split('#')[0] == name for k in layers)}"
            layers[key] = {"kind": type(mod).__name__, "config": _layer_config(mod), "in_group": ig,
                            "out_group": og, "in_size": int(channels_in), "out_size": int(channels_out),
                            "shape": list(x.shape)}
        return run

    for name, module in model.named_modules():
        if isinstance(module, _TIMED) and not list(module.children()):
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    # A one-width layer (norm, activation) is timed along its single width: keep it on the "out" axis only.
    for layer in layers.values():
        if layer["kind"].startswith("BatchNorm") or layer["kind"] in {c.__name__ for c in _ELEMENTWISE}:
            layer["in_group"] = None
    return layers


def _time_layer(layer: Mapping[str, Any], in_w: int, out_w: int, device: torch.device, timed: dict, warmup: int,
                rounds: int, min_sample_ms: float) -> float:
    kind, config = layer["kind"], layer["config"]
    one_width = layer["in_group"] is None and (kind.startswith("BatchNorm") or not (kind.startswith("Conv")
                                                                                      or kind == "Linear"))
    if one_width:
        in_w = out_w
    if kind.startswith("Conv") and config["groups"] > 1 and not config["groups"] == config["in"] == config["out"]:
        g = config["groups"]  # grouped conv: widths stay multiples of its groups
        in_w, out_w = max(g, g * round(in_w / g)), max(g, g * round(out_w / g))
    shape = list(layer["shape"])
    if kind == "Linear":
        shape[-1] = in_w
    else:
        shape[1] = in_w
    key = (kind, json.dumps(config, sort_keys=True), in_w, out_w, tuple(shape))
    if key not in timed:
        module = _build_layer(kind, config, in_w, out_w).to(device).eval()
        x = torch.randn(shape, device=device)
        timed[key] = time_calls(lambda: module(x), device, warmup=warmup, rounds=rounds, min_sample_ms=min_sample_ms)
    return timed[key]


# -- width steps for round_to="auto" ------------------------------------------------------------------------------
def _probe_steps(layers: Mapping[str, Mapping[str, Any]], entries: Mapping[str, Mapping[str, Any]],
                 device: torch.device, timed: dict, warmup: int, rounds: int,
                 min_sample_ms: float) -> dict[str, dict[str, Any]]:
    """Per group at least 16 wide: the summed time of its heaviest writer (output width varied) and heaviest
    reader (input width varied) at ``aligned - d`` channels, ``d`` in :data:`STEP_OFFSETS`, ``aligned`` the
    group's width rounded down to a multiple of 16 (offsets up to half of it)."""
    writers: dict[str, tuple[float, str]] = {}
    readers: dict[str, tuple[float, str]] = {}
    for name, e in entries.items():
        if not (e["kind"].startswith("Conv") or e["kind"] == "Linear"):
            continue
        grouped = e["kind"].startswith("Conv") and e["config"]["groups"] > 1
        if grouped and not e["config"]["groups"] == e["config"]["in"] == e["config"]["out"]:
            continue  # a grouped (not depthwise) conv: its widths move in multiples of its groups
        dense = e["ms"][-1][-1]
        for group, best in ((e["out_group"], writers), (e["in_group"], readers)):
            if group and dense > best.get(group, (-1.0, ""))[0]:
                best[group] = (dense, name)
    steps: dict[str, dict[str, Any]] = {}
    done: dict[str, list[float]] = {}
    for group in sorted(set(writers) | set(readers)):
        names = [best[group][1] for best in (writers, readers) if group in best]
        size = layers[names[0]]["out_size" if group in writers else "in_size"]
        aligned = 16 * (size // 16)
        if aligned < 16:
            continue  # too narrow to tell steps apart: the narrow-group rule decides
        offsets = [d for d in STEP_OFFSETS if d <= aligned // 2]  # a 16-wide group: probed down to 8 channels
        names = list(dict.fromkeys(names))
        # Identical layers (a ResNet stage's blocks) probe alike: time each distinct probe once.
        signature = json.dumps([[layers[n]["kind"], layers[n]["config"], layers[n]["shape"],
                                 layers[n]["in_group"] == group, layers[n]["out_group"] == group] for n in names],
                               sort_keys=True, default=str)
        if signature not in done:
            # Timed in their own passes, forward then backward over the offsets, averaged: a grid timing reused
            # from another moment (other load, clock) or a drift across the pass would otherwise read as a step.
            passes = []
            for index, order in enumerate((offsets, offsets[::-1])):
                fresh: dict = {}
                passes.append({d: sum(_time_probe(layers[n], group, aligned - d, device, fresh, warmup, rounds,
                                                  min_sample_ms) for n in names) for d in order})
                timed.update({("probe", index) + key: value for key, value in fresh.items()})  # counted
            done[signature] = [(passes[0][d] + passes[1][d]) / 2 for d in offsets]
        steps[group] = {"aligned": aligned, "offsets": offsets, "ms": done[signature], "layers": names}
    return steps


def _time_probe(layer: Mapping[str, Any], group: str, width: int, device: torch.device, timed: dict, warmup: int,
                rounds: int, min_sample_ms: float) -> float:
    """``layer`` timed with ``width`` channels on the side(s) belonging to ``group``, the other side dense."""
    in_w = width if layer["in_group"] == group else layer["in_size"]
    out_w = width if layer["out_group"] == group else layer["out_size"]
    config = layer["config"]
    if layer["kind"].startswith("Conv") and config["groups"] > 1:  # depthwise: in and out move together
        in_w = out_w = width
    return _time_layer(layer, in_w, out_w, device, timed, warmup, rounds, min_sample_ms)


def step_from_timings(offsets: list[int], ms: list[float], *, min_saving: float = 0.03, stair: float = 0.8,
                      noise: float = 0.02) -> int | None:
    """The width step the timings favour: the widest step ``s`` in :data:`STEP_CANDIDATES` such that no width
    *between* two multiples of ``s`` is worth its channels; 1 when every candidate has such a width (the kernels
    do not favour a block size); None (no evidence: use the fixed rule) when removing all the probed channels
    saves less than ``min_saving`` of the time, as noise would then decide.

    ``ms[i]`` is the time at ``offsets[i]`` channels below an aligned width. An in-between width is worth its
    channels when it realizes at least ``stair`` of the saving of the straight line between its two neighbouring
    multiples of ``s`` (at or below that chord, it is as good a trade as the step) and at least ``noise`` of the
    aligned time (a smaller difference is within timing noise). A kernel that pads channels to blocks (oneDNN's
    8 or 16, tensor cores' 8) realizes nothing between blocks."""
    t = dict(zip(offsets, ms))
    span = max(offsets)
    if t[0] <= 0 or t[0] - t[span] < min_saving * t[0]:
        return None
    for s in STEP_CANDIDATES:
        if s > span or span % s:
            continue
        worth = False
        for d in offsets:
            upper = s * (d // s)  # the wider neighbouring multiple of s (offsets count channels removed)
            if d == upper or upper + s not in t:
                continue
            line = (t[upper] - t[upper + s]) * (d - upper) / s
            realized = t[upper] - t[d]
            worth = worth or (realized >= stair * line and realized >= noise * t[0])
        if not worth:
            return s
    return 1
