"""Fail before training: check, when fit starts, everything a pruning event will need.

A scheduled event runs after epochs of training; an input it cannot use (a batch format ``batch_fn`` does not
understand, an example input of the wrong shape, a misspelt ``ignore`` entry, an empty validation split for
sensitivity analysis) should not surface only then. :func:`run` is called from ``PruneCallback.on_fit_start``
(after Lightning has set up the model, restored a checkpoint and joined the DDP processes, before the sanity
check and the first training batch) and dry-runs, cheaply, what each event uses:

- every ``ignore`` entry names a module (not ``""``, which is the root);
- the example input (``example_input``, ``LightningModule.example_input_array`` or the inputs of the first
  training batch) goes through the module's forward;
- ``batch_fn`` on one real batch of each dataloader an event reads (training batch for the example input,
  scoring batch for data-driven criteria, validation batch for ``allocation="sensitivity"`` and ``blend``):
  inputs found, and for criteria that need labels, labels present, integer class indices, in range;
- a non-empty validation dataloader for ``allocation="sensitivity"`` and the ``blend`` search.

Pure argument checks (``graph_kwargs``, ``criterion_kwargs``) run in ``PruneCallback.__init__``.

[design] No graph is built here (tracing costs as much as an event's own build); one batch per dataloader and
one no-grad eval-mode forward of two samples. Fetching a batch draws from the global RNGs (a shuffling sampler
seeds itself from torch's generator) and a forward could touch BatchNorm statistics, so both run with the RNG
states, train/eval flags and buffers restored afterwards: training continues exactly as without the checks.
Under DDP every rank checks its own data, then the ranks exchange their results and all raise if any failed,
so no rank trains on while another has stopped.
"""
from __future__ import annotations

import contextlib
import inspect
import random
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..errors import check_mapping
from ..structure.tracing import call_model, move_to_device, preserved_state
from . import distributed
from .data_sources import scoring_dataloader, train_dataloader, validation_dataloader

class PreflightError(ValueError):
    """A fit-start check failed (a ``ValueError``: the message names the parameter and the accepted values)."""


# -- argument checks (PruneCallback.__init__) ------------------------------------------------------------------
def check_graph_kwargs(graph_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``graph_kwargs`` as a dict: unknown keys and an unknown ``trace_mode`` fail naming the accepted ones, then
    the value types are checked as for every graph option (``structure.check_graph_options``)."""
    from ..structure import check_graph_options
    from ..structure.graph import GRAPH_OPTIONS, TRACE_MODES

    kwargs = dict(graph_kwargs or {})
    unknown = sorted(set(kwargs) - set(GRAPH_OPTIONS))
    if unknown:
        raise PreflightError(f"graph_kwargs: unknown key(s) {unknown}; accepted keys: {', '.join(GRAPH_OPTIONS)} "
                             "(ignore and plan are set by PruneCallback itself).")
    if "trace_mode" in kwargs and kwargs["trace_mode"] not in TRACE_MODES:
        raise PreflightError(f"graph_kwargs: trace_mode={kwargs['trace_mode']!r}; accepted values: "
                             f"{', '.join(map(repr, TRACE_MODES))}.")
    return check_graph_options("graph_kwargs", kwargs)


def build_criterion(criterion: Any, criterion_kwargs: Mapping[str, Any] | None) -> Any:
    """The criterion object; errors in ``criterion_kwargs`` name ``criterion_kwargs`` and the keys the criterion's
    constructor accepts. The criterion name is checked first, with its own message."""
    from .. import criteria as criteria_module
    from ..criteria import base

    kwargs = check_mapping("criterion_kwargs", criterion_kwargs)
    if kwargs and not isinstance(criterion, str):
        raise ValueError("criterion_kwargs are only accepted with a criterion name (criterion='l1', ...); got a "
                         f"{type(criterion).__name__} object: configure it directly instead.")
    built = criteria_module.get(criterion)
    if not kwargs:
        return built
    base._load_builtin()
    factory = base._CRITERIA.get(criterion.split("+")[0].strip().lower())
    if factory is not None:
        parameters = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        accepted = [name for name, p in parameters.items()
                    if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown and not takes_any:
            raise PreflightError(f"criterion_kwargs: unknown key(s) {unknown} for criterion {criterion!r}; "
                                 f"accepted keys: {', '.join(accepted) or '(none)'}.")
    try:
        return criteria_module.get(criterion, **kwargs)
    except TypeError as error:  # a factory taking **kwargs passes them on: name its class's keys
        accepted = [p for p in inspect.signature(type(getattr(built, "base", built)).__init__).parameters
                    if p not in ("self", "args", "kwargs")]
        raise ValueError(f"criterion_kwargs={kwargs!r} are not accepted by criterion {criterion!r} ({error}); "
                         f"accepted keys: {', '.join(map(repr, accepted)) or 'none'}.") from None


# -- fit-start checks ------------------------------------------------------------------------------------------
def run(callback: Any, trainer: Any, pl_module: Any) -> None:
    """Dry-run what the callback's pending events need; raise :class:`PreflightError` (on every rank) if any
    check fails."""
    pending = [epoch for epoch, _ in callback.events if epoch not in callback.done_epochs]
    if not pending:  # resumed after the last event: nothing left to prepare for
        return
    error: BaseException | None = None
    try:
        _dry_run(callback, trainer, pl_module)
    except Exception as caught:  # noqa: BLE001 - any failure must reach the other ranks before raising
        error = caught
    error = _agree_across_ranks(trainer, error)
    if error is not None:
        raise error


def _dry_run(callback: Any, trainer: Any, pl_module: Any) -> None:
    check_ignore(callback.ignore, pl_module)
    split = callback.batch_fn or _default_batch_fn()
    criterion = callback.criterion
    needs_scoring = bool(criterion.requires_data or callback.sensitivity.get("recalibrate_batches"))
    needs_validation = callback.allocation == "sensitivity" or hasattr(criterion, "search")
    forward_fn = callback.graph_kwargs.get("forward_fn")

    example = callback.example_input if callback.example_input is not None else pl_module.example_input_array
    source = "example_input" if callback.example_input is not None else "LightningModule.example_input_array"
    if example is None:
        loader = train_dataloader(trainer)
        if loader is None:
            raise PreflightError("example_input: PruneCallback needs an example input; set "
                                 "LightningModule.example_input_array, pass example_input=, or provide a train "
                                 "dataloader.")
        inputs, _ = check_batch(first_batch(loader, "train"), split, "train")
        example, source = _first_rows(inputs), "the inputs of the first training batch (via batch_fn)"
    check_forward(pl_module, example, source, forward_fn)
    if getattr(callback, "latency_input", None) is not None:  # the batch latency targets are timed on
        try:
            check_forward(pl_module, callback.latency_input, "latency_input", forward_fn)
        except PreflightError as error:
            raise PreflightError("latency_input" + str(error)[len("example_input"):]) from error.__cause__
    if getattr(callback, "target_kind", None) == "latency" and trainer.global_rank == 0:
        # rank zero measures latency: say before training if its measurements will depend on the allocator
        callback._latency_target(move_to_device(example, pl_module.device), pl_module).check_allocator(pl_module)
        callback._allocator_checked = True

    if needs_scoring:
        loader = scoring_dataloader(callback, trainer)
        if loader is None:
            raise PreflightError(f"scoring_dataloader: criterion {_name(criterion)!r} scores on data, but there is "
                                 "no scoring or train dataloader; pass scoring_dataloader= or a train dataloader.")
        inputs, labels = check_batch(first_batch(loader, "scoring"), split, "scoring")
        if criterion.requires_labels:
            check_labels(labels, inputs, _num_classes(criterion, trainer), f"criterion {_name(criterion)!r}", "scoring")
        check_forward(pl_module, _first_rows(inputs), "the inputs of the first scoring batch (via batch_fn)",
                      forward_fn)

    if needs_validation:
        what = "allocation='sensitivity'" if callback.allocation == "sensitivity" else f"criterion {_name(criterion)!r}"
        loader = validation_dataloader(trainer)
        if loader is None:
            raise PreflightError(f"{what} measures validation accuracy, but the fit has no validation dataloader; "
                                 "accepted: a val_dataloader (held out from the training set) on the datamodule or "
                                 "module, or val_dataloaders= in Trainer.fit.")
        batch = first_batch(loader, "validation", required=False)
        if batch is None:
            raise PreflightError(f"{what} measures validation accuracy, but the validation dataloader is empty (an "
                                 "empty validation split would give 0.0 accuracy to every trial); give it at least "
                                 "one batch, e.g. val_fraction > 0.")
        inputs, labels = check_batch(batch, split, "validation")
        check_labels(labels, inputs, None, what, "validation")


def check_ignore(ignore: Iterable[str], module: torch.nn.Module) -> None:
    """Every ``ignore`` entry is the name of a submodule (``""`` names the root and is refused)."""
    names = [name for name, _ in module.named_modules() if name]
    for entry in ignore:
        if not isinstance(entry, str) or not entry.strip():
            raise PreflightError(f"ignore: {entry!r} is not a module name; accepted values are non-empty names from "
                                 f"LightningModule.named_modules(), e.g. {names[:3]}.")
        if entry not in names:
            import difflib

            close = difflib.get_close_matches(entry, names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise PreflightError(f"ignore: {entry!r} is not a module of {type(module).__name__}; accepted values "
                                 f"are names from LightningModule.named_modules().{hint}")


def check_batch(batch: Any, batch_fn: Callable, what: str) -> tuple[Any, Any]:
    """``batch_fn(batch)`` on a real batch gives ``(inputs, labels)`` with inputs found."""
    try:
        result = batch_fn(batch)
    except Exception as error:  # noqa: BLE001 - re-raised with where it happened
        raise PreflightError(f"{error} [checked before training on the first batch of the {what} dataloader]") \
            from error
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise PreflightError(f"batch_fn: must return (inputs, labels), got {type(result).__name__} for the first "
                             f"batch of the {what} dataloader.")
    inputs, labels = result
    if inputs is None:
        raise PreflightError(f"batch_fn: found no inputs in the first batch of the {what} dataloader "
                             f"({_describe(batch)}); accepted: (inputs, labels) tuples, dicts with one of the keys "
                             f"{', '.join(_keys()[0])}, or batch_fn=lambda batch: (inputs, labels).")
    return inputs, labels


def check_labels(labels: Any, inputs: Any, num_classes: int | None, who: str, what: str) -> None:
    """Class labels present, one per sample, integer indices >= 0 (or one-hot rows), below ``num_classes``."""
    if labels is None:
        raise PreflightError(f"batch_fn: {who} needs class labels, but batch_fn found none in the first batch of the "
                             f"{what} dataloader; accepted: (inputs, labels) tuples, dicts with one of the keys "
                             f"{', '.join(_keys()[1])}, or batch_fn=lambda batch: (inputs, labels).")
    labels = torch.as_tensor(labels)
    if labels.dim() > 1:  # one-hot or probabilities, as the criteria accept them
        labels = labels.argmax(-1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise PreflightError(f"batch_fn: {who} needs integer class labels, got dtype {labels.dtype} in the first "
                             f"batch of the {what} dataloader.")
    labels = labels.reshape(-1)
    samples = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() else None
    if samples is not None and labels.numel() != samples:
        raise PreflightError(f"batch_fn: {labels.numel()} labels for {samples} samples in the first batch of the "
                             f"{what} dataloader; {who} needs one class label per sample.")
    if labels.numel() and int(labels.min()) < 0:
        raise PreflightError(f"batch_fn: class labels must be >= 0 for {who}, got {int(labels.min())} in the first "
                             f"batch of the {what} dataloader.")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise PreflightError(f"num_classes: label {int(labels.max())} in the first batch of the {what} dataloader is "
                             f"out of range for {who} with num_classes={num_classes}; accepted labels: 0 .. "
                             f"{num_classes - 1} (set criterion_kwargs={{'num_classes': ...}} or the datamodule's "
                             "num_classes to the number of classes).")


def check_forward(module: torch.nn.Module, example: Any, source: str, forward_fn: Callable | None = None) -> None:
    """The module's forward accepts ``example`` (no-grad, eval mode; modes, buffers and RNG restored)."""
    example = move_to_device(example, module.device if hasattr(module, "device") else _device_of(module))
    try:
        with preserved_state(module), torch.no_grad(), _eager():
            module.eval()
            forward_fn(module, example) if forward_fn is not None else call_model(module, example)
    except Exception as error:  # noqa: BLE001 - any failure of the user's forward is reported the same way
        raise PreflightError(
            f"example_input: the forward of {type(module).__name__} fails on {source} (shapes {_shapes(example)}): "
            f"{type(error).__name__}: {error}. Accepted: an input the module's forward takes, e.g. a training "
            "batch's inputs; pass example_input= or set LightningModule.example_input_array."
        ) from error


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled (``torch.compile``) submodules eagerly: a check forward in eval/no-grad mode would otherwise
    compile a graph of its own (seconds) that training never uses."""
    try:
        import torch._dynamo

        return torch._dynamo.config.patch(disable=True)
    except (ImportError, AttributeError):  # pragma: no cover - torch without dynamo
        return contextlib.nullcontext()


def first_batch(loader: Any, what: str, *, required: bool = True) -> Any:
    """The first batch of ``loader`` (a list/tuple of loaders: of the first), leaving every RNG as it was."""
    if isinstance(loader, (list, tuple)) and loader and not isinstance(loader[0], torch.Tensor):
        loader = loader[0]
    elif isinstance(loader, Mapping) and loader:
        loader = next(iter(loader.values()))
    with _rng_preserved():
        iterator = iter(loader)
        try:
            return next(iterator)
        except StopIteration:
            if not required:
                return None
            raise PreflightError(f"The {what} dataloader is empty; PruneCallback needs at least one batch of it.")
        finally:
            del iterator  # shuts worker processes down now


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """torch (CPU and CUDA), Python and NumPy RNG states restored after the block."""
    python_state = random.getstate()
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's dependencies here
        np, numpy_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if np is not None:
                np.random.set_state(numpy_state)


# -- DDP -------------------------------------------------------------------------------------------------------
def _agree_across_ranks(trainer: Any, error: BaseException | None) -> BaseException | None:
    """Every rank learns whether any rank failed; a rank that passed raises the first failing rank's message."""
    if not distributed.is_distributed(trainer):
        return error
    import torch.distributed as dist

    messages: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        return error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        return PreflightError(f"rank {rank}: {message}")
    return None


# -- small helpers ---------------------------------------------------------------------------------------------
def _default_batch_fn() -> Callable:
    from ..criteria.scoring import default_batch_fn

    return default_batch_fn


def _keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..criteria.scoring import INPUT_KEYS, LABEL_KEYS

    return INPUT_KEYS, LABEL_KEYS


def _first_rows(inputs: Any, rows: int = 2) -> Any:
    """The first ``rows`` samples of a tensor / tuple / dict of tensors (the event's example input is the first
    two samples of a training batch)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:rows]
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_first_rows(x, rows) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _first_rows(v, rows) for k, v in inputs.items()}
    return inputs


def _num_classes(criterion: Any, trainer: Any) -> int | None:
    """``num_classes`` of the criterion (walking wrappers and blends), else the datamodule's."""
    stack = [criterion]
    while stack:
        current = stack.pop()
        if current is None:
            continue
        value = getattr(current, "num_classes", None)
        if isinstance(value, int):
            return value
        stack.append(getattr(current, "base", None))
        stack.extend(getattr(current, "criteria", None) or [])
    value = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    return int(value) if isinstance(value, int) else None


def _name(criterion: Any) -> str:
    return getattr(criterion, "name", type(criterion).__name__)


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    return f"a {type(batch).__name__}"


def _shapes(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return list(example.shape)
    if isinstance(example, (list, tuple)):
        return [_shapes(x) for x in example]
    if isinstance(example, dict):
        return {k: _shapes(v) for k, v in example.items()}
    return type(example).__name__


def _device_of(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
