"""Running model code with bounds and without side effects.

Torch-Pruning traces a model by running it. Two hazards follow: some architectures make the tracer hang or
exhaust memory (Swin, MaxViT, timm ReXNet), and a train-mode forward updates BatchNorm statistics and consumes
random numbers (dropout). The helpers here bound the first and undo the second.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from ..errors import GraphBuildTimeout

T = TypeVar("T")


class _BoundExceeded(BaseException):
    """Injected into the working thread by the watchdog. BaseException so that broad `except Exception` in
    traced user code cannot swallow it."""


def _resident_memory_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else ctypes.c_void_p(0)
    )


def run_bounded(
    fn: Callable[[], T],
    *,
    what: str,
    timeout_s: float | None,
    max_memory_mb: float | None = None,
    poll_s: float = 0.05,
) -> T:
    """Run ``fn()`` in the calling thread; abort it with :class:`GraphBuildTimeout` if it runs longer than
    ``timeout_s`` seconds or grows resident memory by more than ``max_memory_mb``.

    A watchdog thread raises an exception inside the worker, which works wherever Python bytecode runs (the
    tracer is Python loops); it does not need the main thread or signals, so it is safe inside a Trainer.
    """
    if timeout_s is None and max_memory_mb is None:
        return fn()
    worker = threading.get_ident()
    lock = threading.Lock()
    state = {"finished": False, "reason": None}
    start_time = time.monotonic()
    start_memory = _resident_memory_mb()

    def watchdog() -> None:
        while True:
            time.sleep(poll_s)
            reason = None
            if timeout_s is not None and time.monotonic() - start_time > timeout_s:
                reason = f"took longer than {timeout_s:g} s"
            elif max_memory_mb is not None and start_memory is not None:
                now = _resident_memory_mb()
                if now is not None and now - start_memory > max_memory_mb:
                    reason = f"grew memory by more than {max_memory_mb:g} MiB"
            with lock:
                if state["finished"]:
                    return
                if reason is not None:
                    state["reason"] = reason
                    _set_async_exc(worker, _BoundExceeded)
                    return

    thread = threading.Thread(target=watchdog, name="lightning-prune-watchdog", daemon=True)
    thread.start()
    try:
        result = fn()
    except _BoundExceeded:
        raise GraphBuildTimeout(
            f"{what} {state['reason']} and was stopped. Torch-Pruning cannot build a dependency graph for "
            "this architecture within bounds; raise `build_timeout`/`max_build_memory_mb`, or exclude the "
            "offending blocks with `ignore`."
        ) from None
    finally:
        with lock:
            state["finished"] = True
            if state["reason"] is not None:
                _set_async_exc(worker, None)  # clear an injection that arrived after fn() returned
    return result


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, the values of all buffers (BatchNorm running statistics,
    ``num_batches_tracked``) and the global RNG state after the block, so a forward pass made for tracing or
    checking leaves training exactly as it was (also bitwise across DDP ranks)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@contextlib.contextmanager
def all_requiring_grad(model: nn.Module) -> Iterator[None]:
    """Let every parameter require grad inside the block, then restore each flag. Torch-Pruning follows autograd's
    ``grad_fn`` graph: a frozen leading layer (input and weights without grad) leaves no ``grad_fn`` and would be
    invisible to the tracer, and its channels silently unprunable."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def batch_of_at_least(example_inputs: Any, minimum: int = 2) -> Any:
    """Repeat batch-1 tensors so train-mode BatchNorm accepts them (it needs more than one value per channel)."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.dim() > 0 and example_inputs.shape[0] < minimum:
            reps = [minimum] + [1] * (example_inputs.dim() - 1)
            return example_inputs[:1].repeat(*reps)
        return example_inputs
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(batch_of_at_least(x, minimum) for x in example_inputs)
    if isinstance(example_inputs, dict):
        return {k: batch_of_at_least(v, minimum) for k, v in example_inputs.items()}
    return example_inputs


def first_sample(example_inputs: Any) -> Any:
    """Keep only the first sample of every tensor (for per-image FLOPs)."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1] if example_inputs.dim() > 0 else example_inputs
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(first_sample(x) for x in example_inputs)
    if isinstance(example_inputs, dict):
        return {k: first_sample(v) for k, v in example_inputs.items()}
    return example_inputs


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way Torch-Pruning does: a dict as keywords, a tuple/list as positional arguments."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)


def move_to_device(example_inputs: Any, device: torch.device) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.to(device)
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(move_to_device(x, device) for x in example_inputs)
    if isinstance(example_inputs, dict):
        return {k: move_to_device(v, device) for k, v in example_inputs.items()}
    return example_inputs


def output_shapes(output: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor in a (nested) model output, in a stable order, batch dimension dropped."""
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape[1:])]
    if isinstance(output, dict):
        return [s for k in sorted(output) for s in output_shapes(output[k])]
    if isinstance(output, (list, tuple)):
        return [s for x in output for s in output_shapes(x)]
    return []


class EventDeadline:
    """One time bound for a whole pruning event: graph build, exclusion probing and surgery all draw on it.

    ``seconds=None`` disables it. :meth:`check` raises :class:`EventTimeoutError` naming ``event_timeout`` and the
    stage reached; :meth:`bound` gives the seconds a bounded step (a graph build) may still take."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + float(seconds)

    def remaining(self) -> float | None:
        return None if self._end is None else self._end - time.monotonic()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def bound(self, other: float | None) -> float | None:
        """The tighter of ``other`` (e.g. ``build_timeout``) and the time left (at least a millisecond)."""
        remaining = self.remaining()
        if remaining is None:
            return other
        remaining = max(remaining, 1e-3)
        return remaining if other is None else min(other, remaining)

    def error(self, stage: str) -> "EventTimeoutError":
        from ..errors import EventTimeoutError

        return EventTimeoutError(
            f"event_timeout={self.seconds:g} s was reached while {stage}; the pruning event was stopped and the model "
            "is unchanged. Raise event_timeout (seconds, or None for no bound), or add the slow blocks to ignore=."
        )

    def check(self, stage: str) -> None:
        if self.expired():
            raise self.error(stage)
