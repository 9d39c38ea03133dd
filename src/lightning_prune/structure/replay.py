"""Running one model many times on the same input, replaying the part that did not change.

A sensitivity trial (paper 2) masks one group's channels by zeroing the weights of the modules that read them;
everything the network computes before the first of those modules is identical to the unmasked network. On a
ResNet that is about half of the FLOPs of every trial. :class:`PrefixReplay` records one unmasked pass of a batch
(every leaf module's output, in call order) and then runs each trial with the leaf calls before its *cut*
returning the recorded values instead of computing them: the outputs are the same tensors bit for bit, so every
decision is the one the full passes would give, at a fraction of the work.

Outputs are kept by reference unless the pass itself modifies them in place later (tensor version counters tell;
the passes must run under ``torch.no_grad``, not ``inference_mode``, whose tensors have no version counter).
Only leaf modules (no children) are replayed; functional code between them (``x + identity``, ``torch.cat``,
``flatten``) always runs, so the model needs no rewriting and no tracing. Two passes must call the same leaf
modules in the same order up to the cut (a static network; a mismatch is an error, never a silent wrong value).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Collection, Iterator

import torch
from torch import nn

_CONV = nn.modules.conv._ConvNd


class ReplayMismatch(RuntimeError):
    """A replayed pass called other modules, or in another order, than the recorded one."""


def _clone(value: Any) -> Any:
    """A private copy of a module output (consumers may modify outputs in place), or ``None`` when the output is
    of a kind that cannot be kept."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        items = [_clone(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _clone(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return None


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _macs(module: nn.Module, output: Any) -> int:
    """Multiply-accumulates of one call of a convolution or linear layer (other layers count 0): the weight of a
    call in the machine-independent cost of a replayed pass."""
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, _CONV):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def default_budget_mb(device: torch.device) -> float:
    """A quarter of the memory free on ``device`` now (CUDA: the driver's free memory; CPU: ``MemAvailable``),
    1024 MB where it cannot be read."""
    try:
        if device.type == "cuda":
            return 0.25 * torch.cuda.mem_get_info(device)[0] / 2**20
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return 0.25 * int(line.split()[1]) / 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return 1024.0


@dataclasses.dataclass(frozen=True)
class RecordedPass:
    """One recorded pass of :class:`PrefixReplay` (:meth:`PrefixReplay.snapshot`)."""

    calls: list[nn.Module]
    outputs: list[Any]
    aliased: list[bool]
    macs: list[int]
    stored_bytes: int
    mutated: frozenset[int]  # the calls whose outputs the pass modified in place: replayed as copies


class PrefixReplay:
    """Record one pass of ``model``, then replay its first leaf-module calls in later passes.

    Args:
        model: the network; its leaf modules' ``forward`` is wrapped while :meth:`attached` is active.
        budget_mb: memory for the recorded outputs of one pass (on the model's device; default
            :func:`default_budget_mb`). Recording stops at the first call that would exceed it; later cuts are
            clipped to what was recorded (exact, less saved: :attr:`truncated` tells).
    """

    def __init__(self, model: nn.Module, budget_mb: float | None = None):
        self.model = model
        if budget_mb is None:
            parameter = next(model.parameters(), None)
            budget_mb = default_budget_mb(parameter.device if parameter is not None else torch.device("cpu"))
        self.budget_bytes = int(budget_mb * 2**20)
        self._leaves = list({id(m): m for m in model.modules() if next(m.children(), None) is None}.values())
        self._mode: str | None = None
        self._index = 0
        self._cut = 0
        self._calls: list[nn.Module] = []
        self._outputs: list[Any] = []
        self._aliased: list[bool] = []
        self._macs: list[int] = []
        self._stored_bytes = 0
        self._storing = True
        # Calls whose output the pass itself later modifies in place (``out += identity``, an in-place ReLU):
        # only those are recorded and replayed as copies; the others are handed out as the recorded tensors.
        # Unknown (None) until a first pass has been watched.
        self._mutated: set[int] | None = None
        self._live: list[tuple[Any, int | None]] = []

    # -- wrapping ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self) -> Iterator["PrefixReplay"]:
        """Wrap every leaf module's ``forward`` (an instance attribute, so hooks and the class stay as they are);
        restored on exit."""
        patched = []
        try:
            for module in self._leaves:
                own = module.__dict__.get("forward")
                module.forward = self._wrap(module, module.forward)
                patched.append((module, own))
            yield self
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own
            self._mode = None

    def _wrap(self, module: nn.Module, forward: Callable) -> Callable:
        def replayed(*args: Any, **kwargs: Any) -> Any:
            index = self._index
            self._index += 1
            if self._mode == "replay" and index < self._cut:
                return self._replay(index, module, args)
            output = forward(*args, **kwargs)
            if self._mode == "record":
                self._record(module, args, output)
            return output

        return replayed

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._calls.append(module)
        self._macs.append(_macs(module, output))
        if not self._storing:
            return
        size = _nbytes(output)
        version = output._version if isinstance(output, torch.Tensor) else None
        copied = version is None or self._mutated is None or len(self._outputs) in self._mutated
        kept = (_clone(output) if copied else output) if self._stored_bytes + size <= self.budget_bytes else None
        if kept is None:
            self._storing = False  # the replayable prefix must be contiguous
            return
        self._stored_bytes += size
        self._outputs.append(kept)
        self._live.append((output, version))
        # An in-place layer (ReLU(inplace=True)) returns its input: replaying it must write into that input too.
        self._aliased.append(bool(args) and output is args[0])

    def _settle(self) -> None:
        """After a recorded pass: learn which outputs the pass modified in place after their call. Those stay
        copies; the others are kept as the pass left them (unchanged) and handed out without copying. A call
        that was kept by reference and yet modified ends the replayable prefix (the next pass copies it)."""
        mutated = {i for i, (out, version) in enumerate(self._live) if version is None or out._version != version}
        if self._mutated is None:
            self._mutated = mutated
            self._outputs = [kept if i in mutated else self._live[i][0] for i, kept in enumerate(self._outputs)]
        elif not mutated <= self._mutated:
            del self._outputs[min(mutated - self._mutated):]
            self._mutated |= mutated
        self._live = []

    def _replay(self, index: int, module: nn.Module, args: tuple) -> Any:
        if self._calls[index] is not module:
            raise ReplayMismatch(
                f"prefix replay: call {index} went to {type(module).__name__}, the recorded pass called "
                f"{type(self._calls[index]).__name__} there; the network's control flow depends on its weights or "
                "on state. Disable it with sensitivity={'reuse_prefix': False}.")
        value = self._outputs[index]
        if index in self._mutated:
            value = _clone(value)
        if self._aliased[index]:
            args[0].copy_(value)
            return args[0]
        return value

    # -- passes ------------------------------------------------------------------------------------------------
    def record(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` (a forward of the unchanged model) and record it; returns its result."""
        self._calls, self._outputs, self._aliased, self._macs, self._live = [], [], [], [], []
        self._stored_bytes, self._storing = 0, True
        self._mode, self._index = "record", 0
        try:
            result = run()
        finally:
            self._mode = None
        self._settle()
        return result

    def snapshot(self) -> "RecordedPass":
        """The last recorded pass, to :meth:`restore` later instead of recording the same pass again (the model's
        weights, buffers and inputs unchanged in between: the caller's promise)."""
        return RecordedPass(list(self._calls), list(self._outputs), list(self._aliased), list(self._macs),
                            self._stored_bytes, frozenset(self._mutated or ()))

    def restore(self, recorded: "RecordedPass") -> None:
        """Make ``recorded`` (from :meth:`snapshot`) the pass that :meth:`replay` replays."""
        self._calls, self._outputs = list(recorded.calls), list(recorded.outputs)
        self._aliased, self._macs = list(recorded.aliased), list(recorded.macs)
        self._stored_bytes, self._live = recorded.stored_bytes, []
        self._mutated = set(recorded.mutated) | (self._mutated or set())

    def replay(self, run: Callable[[], Any], cut: int) -> Any:
        """Run ``run()`` with the first ``cut`` leaf calls (clipped to what was recorded) replayed."""
        self._mode, self._index, self._cut = "replay", 0, min(cut, len(self._outputs))
        try:
            return run()
        finally:
            self._mode = None

    # -- where a change starts to matter -----------------------------------------------------------------------
    def cut_for(self, tensors: Collection[torch.Tensor]) -> int:
        """The number of leading calls of the recorded pass that cannot see a change to ``tensors`` (parameters
        about to be modified in place): the index of the first call of a leaf module holding one of them (weights
        may be shared). 0 when none is held by a called leaf module (the use cannot be located)."""
        pointers = {t.data_ptr() for t in tensors}
        if not pointers:
            return 0
        for index, module in enumerate(self._calls):
            if any(p.data_ptr() in pointers for p in module.parameters(recurse=False)):
                return index
        return 0

    @property
    def truncated(self) -> bool:
        """True when the last recorded pass did not fit the budget (the replayable prefix ends early)."""
        return len(self._outputs) < len(self._calls)

    def computed_fraction(self, cut: int) -> float:
        """Share of the recorded pass's convolution/linear MACs that a replay with ``cut`` computes."""
        total = sum(self._macs)
        if total == 0:
            return 1.0
        return 1.0 - sum(self._macs[: min(cut, len(self._outputs))]) / total
