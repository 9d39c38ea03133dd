"""``PruneCallback`` beside the rest of a Lightning user's set-up.

* **Both import names.** ``pytorch_lightning`` and ``lightning.pytorch`` are two copies of the same classes, so an
  ``isinstance`` check against one misses the other (a ``lightning.pytorch`` ``TensorBoardLogger`` is not a
  ``pytorch_lightning`` one). Every class check of the callbacks goes through :func:`is_lightning_instance`.
* **Callbacks that hold model copies.** Weight averaging (``WeightAveraging``, ``EMAWeightAveraging``,
  ``StochasticWeightAveraging``) keeps a copy of the LightningModule; every surgery of an event is applied to the
  copy too (same groups, same channel indices), so the average of the kept channels survives and the copy keeps
  the shapes of the model it is averaged with. Callbacks that hold parameter *names* or the optimizer
  (``BaseFinetuning``, ``LearningRateMonitor``, SWA's ``SWALR``) keep working because the optimizers are edited in
  place. Combinations that cannot work fail in ``setup`` (:func:`check_callbacks`).
* **Frozen parameters.** A group whose producers are all frozen (``requires_grad=False``) is not pruned unless
  ``prune_frozen=True`` (:func:`frozen_groups`); surgery keeps ``requires_grad`` per parameter either way.
* **torch.compile.** Tracing, FLOPs counting and surgery run on the original modules (:func:`eager_forward`);
  the compiled wrappers stay in place and dynamo recompiles for the new shapes on the next call.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Iterator

import torch
from torch import nn

#: The two import names of Lightning; ``lightning.pytorch`` is used when the ``lightning`` package is installed.
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


@functools.lru_cache(maxsize=None)
def lightning_classes(path: str) -> tuple[type, ...]:
    """The class at ``path`` (e.g. ``"loggers.TensorBoardLogger"``) in every installed Lightning namespace."""
    module_path, _, name = path.rpartition(".")
    found = []
    for namespace in NAMESPACES:
        try:
            module = importlib.import_module(f"{namespace}.{module_path}" if module_path else namespace)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def is_lightning_instance(obj: Any, path: str) -> bool:
    """``isinstance(obj, <namespace>.<path>)`` for either Lightning namespace."""
    classes = lightning_classes(path)
    return bool(classes) and isinstance(obj, classes)


def tensorboard_loggers(trainer: Any) -> list[Any]:
    """The trainer's TensorBoard loggers, of either namespace."""
    return [lg for lg in trainer.loggers if is_lightning_instance(lg, "loggers.TensorBoardLogger")]


# -- callbacks that hold model copies ------------------------------------------------------------------------------
def averaged_copies(trainer: Any) -> list[tuple[Any, nn.Module]]:
    """``(callback, model copy)`` for every callback that keeps a copy of the LightningModule in step with it."""
    copies = []
    for callback in trainer.callbacks:
        if is_lightning_instance(callback, "callbacks.WeightAveraging"):
            averaged = getattr(callback, "_average_model", None)  # torch.optim.swa_utils.AveragedModel
            if averaged is not None:
                copies.append((callback, averaged.module))
        elif is_lightning_instance(callback, "callbacks.StochasticWeightAveraging"):
            averaged = getattr(callback, "_average_model", None)  # a deepcopy of the LightningModule
            if averaged is not None:
                copies.append((callback, averaged))
    return copies


class CopySurgery:
    """Applies each surgery of the LightningModule to the model copies of other callbacks.

    The copies have the module names of the LightningModule, hence the same channel groups numbered the same
    way: removing the same indices keeps, in each copy, exactly the averages of the kept channels. One dependency
    graph per copy is traced lazily at the first surgery of an event and reused by later rounds."""

    def __init__(self, trainer: Any, example_inputs: Any, graph_kwargs: dict[str, Any]):
        self.copies = averaged_copies(trainer)
        self.example_inputs = example_inputs
        self.graph_kwargs = {k: v for k, v in graph_kwargs.items() if k != "ignore"}
        self._graphs: dict[int, Any] = {}

    def __call__(self, removed: dict[str, list[int]]) -> None:
        from ..structure import DependencyGraph
        from ..structure.tracing import move_to_device

        if not removed:
            return
        for callback, model in self.copies:
            graph = self._graphs.get(id(model))
            if graph is None:
                device = next(model.parameters()).device
                with eager_forward(model):
                    graph = DependencyGraph(model, move_to_device(self.example_inputs, device), **self.graph_kwargs)
                self._graphs[id(model)] = graph
            try:
                with eager_forward(model):
                    graph.prune_groups(removed)
            except Exception as error:
                raise RuntimeError(
                    f"PruneCallback could not apply the event's surgery to the model copy of "
                    f"{type(callback).__name__} ({type(error).__name__}: {error}); its averaged weights no longer "
                    "match the model. Remove the callback or report this as a bug."
                ) from error


#: Callbacks that cannot work beside PruneCallback, and why.
INCOMPATIBLE = {
    "callbacks.ModelPruning": (
        "it reparametrizes weights as weight_orig * weight_mask (torch.nn.utils.prune), which physical channel "
        "removal cannot slice consistently; use one pruning callback"
    ),
}


def check_callbacks(trainer: Any) -> None:
    """Raise in ``setup`` for a combination that cannot work, naming the other callback and why."""
    for callback in trainer.callbacks:
        for path, why in INCOMPATIBLE.items():
            if is_lightning_instance(callback, path):
                raise ValueError(f"PruneCallback cannot run beside {type(callback).__name__}: {why}.")


# -- frozen parameters ---------------------------------------------------------------------------------------------
def frozen_groups(graph: Any) -> list[str]:
    """Groups whose producers (the convs/linears whose outputs are the group's channels) are all frozen: every
    parameter they own has ``requires_grad=False``."""
    names = []
    for group in graph.groups:
        params = [p for m in group.producers for p in m.module.parameters(recurse=False)]
        if params and not any(p.requires_grad for p in params):
            names.append(group.name)
    return names


def skip_groups(graph: Any, names: list[str]) -> None:
    """Leave ``names`` out of this event's groups (as if their producers were ignored), without recording them as
    unprunable: a group that is unfrozen later is pruned at later events."""
    for name in names:
        for member in graph.group(name).producers:
            graph.ignored.update(member.module.modules())
    graph._groups = None


def _event_graph(callback: Any, trainer: Any, pl_module: nn.Module) -> Any:
    """A dependency graph like the one an event builds (same ignore list, plan and options)."""
    from ..structure import DependencyGraph

    example = callback._example_input(trainer, pl_module)
    return DependencyGraph(pl_module, example, ignore=[*callback.ignore, *sorted(callback.excluded_groups)],
                           plan=callback.plan, **callback.graph_kwargs)


def announce_frozen_groups(callback: Any, trainer: Any, pl_module: nn.Module) -> None:
    """Say once, before training, which groups are left unpruned because their producers are frozen."""
    from pytorch_lightning.utilities import rank_zero_warn

    callback._frozen_announced = None
    if callback.prune_frozen or all(p.requires_grad for p in pl_module.parameters()):
        return
    callback._frozen_announced = frozen_groups(_event_graph(callback, trainer, pl_module))
    if callback._frozen_announced:
        rank_zero_warn(f"PruneCallback: groups {callback._frozen_announced} are not pruned: all their producers are "
                       "frozen (requires_grad=False). Pass prune_frozen=True to prune them (they stay frozen).")


def skip_frozen_groups(callback: Any, graph: Any) -> None:
    """At an event: leave out the groups whose producers are all frozen (unless ``prune_frozen``); warn when that
    set differs from the one announced (e.g. a fine-tuning callback froze or unfroze layers since)."""
    from pytorch_lightning.utilities import rank_zero_warn

    if callback.prune_frozen:
        return
    frozen = frozen_groups(graph)
    if frozen and frozen != getattr(callback, "_frozen_announced", None):
        rank_zero_warn(f"PruneCallback: groups {frozen} are not pruned at this event: all their producers are "
                       "frozen (requires_grad=False); prune_frozen=True prunes them.")
        callback._frozen_announced = frozen
    skip_groups(graph, frozen)


# -- torch.compile -------------------------------------------------------------------------------------------------
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextlib.contextmanager
def eager_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` eagerly inside the block: Torch-Pruning's tracer, fvcore's ``torch.jit.trace`` and the
    scoring hooks see the original modules, and surgery edits them in place.

    Two compiled forms are undone for the block and restored afterwards (the module tree and its names are not
    changed, so plans and checkpoints are the same as without compile):

    * ``trainer.fit(torch.compile(module))``: Lightning unwraps the ``OptimizedModule`` and replaces the module's
      ``forward``/``*_step`` methods by dynamo-wrapped ones (``module._compiler_ctx`` keeps the originals);
    * ``self.model = torch.compile(net)``: every ``OptimizedModule`` inside calls its ``_orig_mod`` directly.

    After surgery the parameter shapes differ, so dynamo's guards fail on the next compiled call and it
    recompiles for the pruned model."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in model.modules():
            ctx = getattr(module, "_compiler_ctx", None)
            if isinstance(ctx, dict):
                for method in _COMPILED_METHODS:
                    original = ctx.get(f"original_{method}")
                    if original is not None and method in vars(module):
                        saved.append((module, method, vars(module)[method]))
                        setattr(module, method, original)
            if _is_optimized_module(module) and "forward" in vars(module):
                saved.append((module, "forward", vars(module)["forward"]))
                module.forward = module._orig_mod.__call__
        yield model
    finally:
        for module, method, compiled in reversed(saved):
            setattr(module, method, compiled)


def _is_optimized_module(module: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(module, OptimizedModule)


def _is_compiled_function(fn: Any) -> bool:
    return callable(fn) and getattr(fn, "_torchdynamo_orig_callable", None) is not None


def check_compiled_forms(pl_module: nn.Module) -> None:
    """Raise in ``setup`` for a compiled form that :func:`eager_forward` cannot undo: a ``forward`` compiled as a
    function (``@torch.compile`` on the method, or ``module.forward = torch.compile(module.forward)``)."""
    for name, module in pl_module.named_modules():
        ctx = getattr(module, "_compiler_ctx", None)
        lightning_wrapped = isinstance(ctx, dict) and "forward" in vars(module)
        instance_forward = vars(module).get("forward")
        class_forward = getattr(type(module), "forward", None)
        compiled = (_is_compiled_function(class_forward)
                    or (instance_forward is not None and not lightning_wrapped and not _is_optimized_module(module)
                        and _is_compiled_function(instance_forward)))
        if compiled:
            where = f"{type(module).__name__}.forward" + (f" (module {name!r})" if name else "")
            raise ValueError(
                f"PruneCallback: {where} is a function compiled with torch.compile; it cannot be traced for pruning. "
                "Compile the module instead: trainer.fit(torch.compile(module)), or self.model = "
                "torch.compile(net) in __init__."
            )
