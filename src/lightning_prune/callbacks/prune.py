"""``PruneCallback``: scheduled physical pruning inside a Lightning ``Trainer``."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from .. import criteria as criteria_module
from ..errors import (
    ArgumentTypeError,
    InconsistentRanksError,
    InvalidPlanError,
    NonFiniteScoresError,
    PruningError,
    check_choice,
    check_fraction,
    check_bool,
    check_callable,
    check_int,
    check_int_list,
    check_mapping,
    check_names,
    check_positive_int,
)
from ..allocation import sensitivity_allocator
from ..allocation.latency import LatencyTarget, check_latency_arguments, resolve_target
from ..structure.latency import LatencyModel
from ..pruning import prune_event, resolve_allocation
from ..structure import (
    DependencyGraph,
    ModelSnapshot,
    PruningPlan,
    apply_plan,
    count_flops,
    count_params,
    transplant_optimizer,
)
from . import data_sources, distributed, interop, preflight
from .checkpoints import guard_resume, read_checkpoint
from .transaction import EventTransaction
from .logging import log_baseline, log_dense_baseline, log_prune_event, log_widths_figure
from .schedule import SCHEDULES, build_schedule

CHECKPOINT_KEY = "lightning_prune"
ON_ERROR = ("skip", "raise")


class PruneCallback(Callback):
    """Physically removes channels at scheduled epochs while a LightningModule trains.

    Pruning happens in ``on_train_epoch_start`` of each scheduled epoch, before its first batch, so the rest of
    that epoch fine-tunes the smaller network. Each event scores every channel group with ``criterion``, decides
    how many channels each group loses (``allocation``), removes them from the module in place, slices the state
    of every optimizer of the trainer to match (momentum and Adam moments are kept, LR schedulers continue), and
    logs FLOPs, parameters and widths.

    Args:
        amount: fraction of the prunable channels removed by the end of the schedule, in [0, 1).
        flops_reduction: fraction of fvcore FLOPs removed by the end of the schedule, in (0, 1) (e.g. 0.443, as
            papers report it).
        latency_reduction: fraction of *measured* latency removed by the end of the schedule, in (0, 1): timed on
            the device the model trains on, at ``latency_input`` (default: the example input) and
            ``latency_dtype`` (autocast on CUDA), eval mode, ``inference_mode``, median of rounds. Allocated over a
            per-layer latency lookup table (built at the first event, cached on disk under ``latency_cache``,
            kept in the callback state), then measured and calibrated (:mod:`lightning_prune.allocation.latency`).
            Give exactly one of ``amount``, ``flops_reduction`` and ``latency_reduction``.
        criterion: a criterion name (see :func:`lightning_prune.criteria.available`) or object.
        allocation: ``"uniform"`` (layerwise), ``"global"`` or ``"sensitivity"``; ``scope`` is an older name.
        schedule: ``"one_shot"``, ``"iterative"`` (equal steps) or ``"agp"`` (cubic, Zhu & Gupta).
        epochs: explicit epochs of the events (overrides ``start_epoch``/``end_epoch``/``steps``).
        start_epoch, end_epoch, steps: the events of a named schedule: ``steps`` epochs spread over
            ``[start_epoch, end_epoch]``.
        ignore: module names (relative to the LightningModule, e.g. ``"model.fc"``) never pruned.
        round_to: keep widths multiples of this where possible; ``"auto"`` (latency targets only): per group, the
            step the latency table's measured kernels favour (16, 8, 4 or 1), else 8, or 16 for half/bf16 on CUDA.
        max_group_sparsity: no group loses more than this fraction of its original width.
        scoring_batches: training batches data-driven criteria see per event (>= 1). No optimizer step happens
            while scoring; train/eval modes, gradients and the RNG are restored afterwards.
        scoring_dataloader: batches for scoring; default: the datamodule's ``scoring_dataloader()`` when it has
            one, else the trainer's train dataloader.
        batch_fn: ``batch_fn(batch) -> (inputs, labels)``; default interprets ``(x, y)`` tuples and dicts.
        example_input: input to trace with; default ``LightningModule.example_input_array``, else the first
            training batch.
        sensitivity: keyword arguments of :class:`~lightning_prune.allocation.SensitivityAllocator`; the
            held-out batches come from the trainer's validation dataloader. ``max_group_sparsity`` applies here
            too (as a floor on ``min_width_fraction``). ``{"recalibrate_batches": n}`` re-estimates BatchNorm
            statistics on ``n`` scoring batches before every trial (averaged over DDP ranks). Each event's report lists the rounds
            (``reports[i]["sensitivity_steps"]``: trial accuracies per group, chosen groups).
        log_widths: also log every group's width as a scalar (``prune/width/<group>``).
        graph_kwargs: passed to :class:`~lightning_prune.structure.DependencyGraph`.
        verbose: print a summary per event (rank zero).
        prune_frozen: also prune groups whose producers are all frozen (``requires_grad=False``); by default
            they are left at full width (a warning at the start of fit names them). Pruned or not, every
            parameter keeps its ``requires_grad``.
        on_error: what a failed event does. ``"skip"`` (default): warn, record it in :attr:`failed_events` (kept
            in checkpoints) and the log (``prune/failed_events``), and keep training on the untouched model.
            ``"raise"``: re-raise the error (the model, optimizers and plan are restored first). Either way a
            failed or interrupted event (``KeyboardInterrupt`` included) leaves the exact previous model,
            optimizer state and plan. Non-finite scores, or a non-finite training loss right before an event,
            always skip the event with a warning.
    """

    def __init__(
        self,
        amount: float | None = None,
        flops_reduction: float | None = None,
        criterion: str | criteria_module.Criterion = "l2",
        allocation: str | None = None,
        schedule: str = "one_shot",
        epochs: Sequence[int] | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        steps: int = 3,
        ignore: Iterable[str] = (),
        round_to: int | str | None = None,
        max_group_sparsity: float = 0.9,
        scoring_batches: int = 8,
        scoring_dataloader: Any = None,
        batch_fn: Callable | None = None,
        example_input: Any = None,
        sensitivity: dict[str, Any] | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        log_widths: bool = True,
        graph_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        scope: str | None = None,
        prune_frozen: bool = False,
        on_error: str = "skip",
        latency_reduction: float | None = None,
        latency_input: Any = None,
        latency_dtype: str | None = None,
        latency_cache: str | None = None,
    ):
        super().__init__()
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.target, self.target_kind = resolve_target(amount, flops_reduction, latency_reduction,
                                                       owner="PruneCallback")
        check_choice("schedule", schedule, SCHEDULES)
        check_positive_int("steps", steps)
        # Types first (ints are ints: epochs=[0.7] would silently become epoch 0), values after.
        if epochs is not None:
            check_int_list("epochs", epochs, minimum=0)
        check_int("start_epoch", start_epoch, minimum=0)
        check_int("end_epoch", end_epoch, minimum=0, allow_none=True)
        self.allocation = resolve_allocation(allocation, scope)
        self.latency_dtype = check_latency_arguments(self.target_kind, round_to, latency_input, latency_dtype,
                                                     self.allocation)
        self.latency_input, self.latency_cache = latency_input, latency_cache
        self.criterion = preflight.build_criterion(criterion, criterion_kwargs)
        self.schedule = build_schedule(self.target, schedule=schedule, epochs=epochs, start_epoch=start_epoch,
                                       end_epoch=end_epoch, steps=steps)
        self.ignore = check_names("ignore", ignore)
        if round_to != "auto":
            check_int("round_to", round_to, minimum=1, allow_none=True)
        self.round_to = round_to
        self.max_group_sparsity = check_fraction("max_group_sparsity", max_group_sparsity, allow_zero=False)
        self.scoring_batches = check_positive_int("scoring_batches", scoring_batches)
        if scoring_dataloader is not None and not callable(scoring_dataloader) and not _is_iterable(scoring_dataloader):
            raise ArgumentTypeError(f"scoring_dataloader must be an iterable of batches (a DataLoader), a callable "
                                    f"returning one, or None; got {type(scoring_dataloader).__name__}.")
        self.scoring_dataloader = scoring_dataloader
        self.batch_fn = check_callable("batch_fn", batch_fn)
        _check_example_input(example_input)
        self.example_input = example_input
        self.sensitivity = check_mapping("sensitivity", sensitivity)
        sensitivity_allocator(self.sensitivity)  # unknown or invalid options fail now, not mid-training
        self.log_widths = check_bool("log_widths", log_widths)
        self.graph_kwargs = preflight.check_graph_kwargs(graph_kwargs)
        self.verbose = check_bool("verbose", verbose)
        self.prune_frozen = check_bool("prune_frozen", prune_frozen)
        self._init_state()

    def _init_state(self) -> None:
        """What a fit builds up. Saved in checkpoints, as plain data only (loads with
        ``torch.load(weights_only=True)``), except the private attributes at the end."""
        self.plan = PruningPlan()
        self.done_epochs: list[int] = []
        self.original_flops: int | None = None
        self.original_params: int | None = None
        self.example_shape: list[list[int]] | None = None
        self.reports: list[dict[str, Any]] = []
        #: groups whose removal breaks the model (found at an event, then skipped): ``{group name: reason}``.
        self.excluded_groups: dict[str, str] = {}
        #: events that failed and were skipped: ``{"epoch", "error", "reason"}`` each (``on_error="skip"``).
        self.failed_events: list[dict[str, Any]] = []
        #: latency targets: the lookup table (plain data, rank zero's) and the measured ratio vs the dense model
        self.latency_table: dict[str, Any] | None = None
        self.latency_ratio: float = 1.0
        self._allocator_checked = False  # latency targets: the page-fault check ran before training (preflight)
        self._hooks: list[Callable[[], None]] = []  # removers of everything installed on the trainer/module
        self._last_loss: torch.Tensor | None = None
        self._resume_restore: Callable[[], None] | None = None

    @property
    def events(self) -> list[tuple[int, float]]:
        """``(epoch, cumulative target)`` of the events this fit runs: the schedule, or under ``fast_dev_run`` a
        single event at epoch 0."""
        return list(getattr(self, "_events", self.schedule))

    # -- validation and set-up ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target, kind=self.target_kind)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs = trainer.max_epochs
        self._baseline_logged = self._baseline_pending = False
        self._events = list(self.schedule)
        if stage == "fit" and trainer.fast_dev_run and any(e > 0 for e, _ in self.schedule):
            # A dev run trains a single epoch; it should still exercise scoring, surgery and logging.
            self._events = [(0, self.schedule[-1][1])]
            rank_zero_warn(f"fast_dev_run: the pruning events at epochs {[e for e, _ in self.schedule]} are replaced "
                           "by one event at epoch 0 that reaches the final target.")
        elif stage == "fit" and max_epochs is not None and max_epochs >= 0:
            late = [e for e, _ in self.schedule if e >= max_epochs]
            if late:
                raise ValueError(
                    f"epochs: scheduled pruning epochs {late} are not < max_epochs={max_epochs}; accepted values "
                    f"are epochs in [0, {max_epochs - 1}]."
                )
        interop.check_callbacks(trainer)
        interop.check_compiled_forms(pl_module)
        # A fit that raised skips teardown; whatever it left installed goes now, so hooks never pile up.
        self._remove_hooks()
        # On resume, Lightning loads the weights before callbacks see their state: rebuild the pruned structure
        # from the checkpoint's plan just before the weights are loaded.
        resume_hook = pl_module.register_load_state_dict_pre_hook(self._rebuild_before_loading(trainer))
        self._hooks.append(resume_hook.remove)
        # An unreadable ckpt_path fails with an error naming the file.
        self._hooks.append(guard_resume(trainer.strategy))
        self._resume_restore = None
        self._last_loss = None

    def _remove_hooks(self) -> None:
        hooks, self._hooks = list(getattr(self, "_hooks", [])), []
        for remove in reversed(hooks):
            remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An event in progress was already rolled back in _prune's except path, before the exception reached
        # Lightning, so OnExceptionCheckpoint (which runs after this hook) saves a whole model.
        self._remove_hooks()
        if self._resume_restore is not None:
            # The fit failed while resuming (e.g. a checkpoint of another model): put the module back as it was
            # before the plan was applied to it, so it can be resumed from the right checkpoint.
            self._resume_restore()
            self._resume_restore = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_restore = None  # the checkpoint (if any) is fully loaded: the rebuilt structure stays

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Keep a reference only (no device sync per batch); it is checked at the next event.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._last_loss = loss.detach() if isinstance(loss, torch.Tensor) else None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if stage == "fit" and not self.plan.is_empty() and distributed.is_spawned_worker(trainer):
            distributed.keep_pruned_weights_in_worker(pl_module)

    def _rebuild_before_loading(self, trainer: pl.Trainer) -> Callable:
        def hook(module, state_dict, prefix, *args) -> None:
            if prefix:
                return
            checkpoint = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None) or {}
            saved = checkpoint.get(CHECKPOINT_KEY) or {}
            plan = PruningPlan.from_dict(saved.get("plan"))
            own = module.state_dict()
            shapes_match = all(
                key in own and own[key].shape == value.shape
                for key, value in state_dict.items()
                if isinstance(value, torch.Tensor)
            )
            if plan.is_empty() or shapes_match:
                return
            example = _zeros_like_shapes(saved.get("example_shape"), module)
            snapshot, previous_plan = ModelSnapshot(module), self.plan

            def restore() -> None:
                snapshot.restore()
                self.plan = previous_plan

            with interop.eager_forward(module):
                apply_plan(module, plan, example, **self.graph_kwargs)
            # Weight averaging's copy is restored after the module: give it the pruned structure too.
            for _, averaged in interop.averaged_copies(trainer):
                with interop.eager_forward(averaged):
                    apply_plan(averaged, plan, _to_device(example, next(averaged.parameters()).device),
                               **self.graph_kwargs)
            self.plan = plan
            self._resume_restore = restore

        return hook

    # -- checkpoint state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "done_epochs": list(self.done_epochs),
            "original_flops": self.original_flops,
            "original_params": self.original_params,
            "example_shape": self.example_shape,
            "reports": list(self.reports),
            "excluded_groups": dict(self.excluded_groups),
            "failed_events": [dict(e) for e in self.failed_events],
            "latency_table": self.latency_table,
            "latency_ratio": self.latency_ratio,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = PruningPlan.from_dict(state_dict.get("plan"))
        self.done_epochs = [int(e) for e in state_dict.get("done_epochs", [])]
        self.original_flops = state_dict.get("original_flops")
        self.original_params = state_dict.get("original_params")
        self.example_shape = state_dict.get("example_shape")
        self.reports = list(state_dict.get("reports", []))
        self.excluded_groups = dict(state_dict.get("excluded_groups", {}))
        self.failed_events = [dict(e) for e in state_dict.get("failed_events", [])]
        self.latency_table = state_dict.get("latency_table")
        self.latency_ratio = float(state_dict.get("latency_ratio", 1.0))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # A copy outside the callback section, so load_pruned() works without knowing the callback's state key.
        checkpoint[CHECKPOINT_KEY] = {"plan": self.plan.to_dict(), "example_shape": self.example_shape}

    # -- the schedule ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the sanity check and the first training batch: everything the events will need (preflight.py).
        with interop.eager_forward(pl_module):
            preflight.run(self, trainer, pl_module)
            interop.announce_frozen_groups(self, trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = [(e, t) for e, t in self.events if e == epoch and e not in self.done_epochs]
        with interop.eager_forward(pl_module):  # torch.compile: trace and cut the original modules
            log_dense_baseline(self, trainer, pl_module, event_due=bool(due))
            if due:
                self._prune(trainer, pl_module, due[0][1], epoch)
        self._log_state(trainer, pl_module)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float, epoch: int) -> None:
        """One event as a transaction: on any failure or interruption the module, optimizers and plan are put
        back as they were, then the failure policy (``on_error``) decides between skipping and raising."""
        loss = self._last_loss
        if loss is not None and not bool(torch.isfinite(loss).all()):
            self._record_failure(trainer, pl_module, epoch, "non-finite loss",
                                 f"the training loss before the event is {loss.item()}")
            return
        transaction = EventTransaction(trainer, pl_module, self)
        try:
            self._run_event(trainer, pl_module, target, epoch)
        except BaseException as error:
            transaction.rollback()
            if not isinstance(error, Exception) or isinstance(error, InconsistentRanksError):
                raise  # KeyboardInterrupt/SystemExit, or ranks that disagree: stop, with the model whole
            if isinstance(error, NonFiniteScoresError):
                self._record_failure(trainer, pl_module, epoch, "non-finite scores", str(error))
                return
            if self.on_error == "raise":
                raise
            self._record_failure(trainer, pl_module, epoch, "error", f"{type(error).__name__}: {error}")

    def _record_failure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, reason: str,
                        detail: str) -> None:
        self.failed_events.append({"epoch": int(epoch), "reason": reason, "error": detail})
        rank_zero_warn(f"Pruning at epoch {epoch} failed ({reason}) and was skipped; training continues on the model "
                       f"as it was (model, optimizer state and plan unchanged). {detail}")
        try:
            pl_module.log("prune/failed_events", float(len(self.failed_events)), on_step=False, on_epoch=True,
                          sync_dist=False, rank_zero_only=True)
        except Exception:  # logging is best effort here: the failure is already on record and warned about
            pass

    def _run_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float, epoch: int) -> None:
        example = self._example_input(trainer, pl_module)
        graph = DependencyGraph(pl_module, example, ignore=[*self.ignore, *sorted(self.excluded_groups)],
                                plan=self.plan, **self.graph_kwargs)
        interop.skip_frozen_groups(self, graph)
        _count_earlier_exclusions(graph, pl_module, self.excluded_groups)
        if self.original_flops is None:
            self.original_flops = count_flops(pl_module, example)
            self.original_params = count_params(pl_module)
        self.criterion.reset()
        _give_num_classes(self.criterion, getattr(getattr(trainer, "datamodule", None), "num_classes", None))

        copies = interop.CopySurgery(trainer, example, self.graph_kwargs)  # weight averaging's model copies

        def after_surgery(result) -> None:
            for optimizer in trainer.optimizers:
                transplant_optimizer(optimizer, result.replacements)
            copies(result.removed)

        scoring_data = None
        if self.criterion.requires_data or self.sensitivity.get("recalibrate_batches"):
            scoring_data = distributed.shard_scoring_data(trainer, data_sources.scoring_dataloader(self, trainer),
                                                         self.scoring_batches)
        evaluate = None
        if self.allocation == "sensitivity" or getattr(self.criterion, "calibrates_on_validation", False):
            shard = self.sensitivity.get("shard", "groups") if self.allocation == "sensitivity" else "groups"
            if self.sensitivity.get("recalibrate_batches") and self.allocation == "sensitivity":
                shard = "data"  # re-estimation all-reduces per trial: every rank runs every trial
            evaluate = distributed.validation_accuracy(trainer, pl_module, self.batch_fn, shard=shard)
        latency = self._latency_target(example, pl_module) if self.target_kind == "latency" else None
        try:
            report = prune_event(
                graph, self.criterion, target, target_kind=self.target_kind, allocation=self.allocation,
                round_to=self.round_to, max_group_sparsity=self.max_group_sparsity,
                dataloader=scoring_data if self.criterion.requires_data else None,
                recalibration_data=scoring_data, world_size=trainer.world_size,
                scoring_batches=self.scoring_batches, batch_fn=self.batch_fn,
                reduce_state=distributed.state_reducer(trainer), original_flops=self.original_flops,
                evaluate=evaluate, sensitivity=self.sensitivity, on_surgery=after_surgery,
                before_surgery=distributed.removal_verifier(trainer), collective=distributed.collective(trainer),
                latency=latency, epoch=epoch,
            )
        except BaseException:
            # Groups found unprunable stay remembered; everything else is rolled back by _prune.
            self.excluded_groups.update(graph.excluded)
            raise
        self.excluded_groups.update(graph.excluded)
        if latency is not None:
            self.latency_table, self.latency_ratio = latency.table.to_dict(), latency.ratio
        distributed.rewrap(trainer, pl_module)
        distributed.verify_same_plan(trainer, graph.plan)
        self.plan = graph.plan
        self.done_epochs.append(epoch)
        summary = report.to_dict()
        summary.pop("plan", None)
        summary["epoch"] = epoch
        self.reports.append(summary)
        if getattr(self, "_baseline_pending", False):  # the dense point of the curves, from this event's "before"
            self._baseline_pending = False
            log_baseline(trainer, report.flops_before, report.params_before, report.widths_before, self.log_widths)
        log_prune_event(trainer, report, epoch)
        if self.verbose:
            rank_zero_info(f"[lightning-prune] epoch {epoch}: pruning with {self._criterion_name()} "
                           f"({self.allocation}), target {self.target_kind} {target:.1%}\n{report.summary()}")
        log_widths_figure(trainer, report.original_widths, report.widths_after, epoch)

    def _criterion_name(self) -> str:
        return getattr(self.criterion, "name", type(self.criterion).__name__)

    def _log_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.reports and self.original_flops is None:
            return
        last = self.reports[-1] if self.reports else None
        if last is None:
            return
        metrics = {
            "prune/flops": float(last["flops_after"]),
            "prune/params": float(last["params_after"]),
            "prune/flops_reduction": float(last["flops_reduction"]),
            "prune/channel_sparsity": float(last["channel_sparsity"]),
        }
        if last.get("latency_ratio") is not None:
            metrics["prune/latency_ms"] = float(last["latency_after_ms"])
            metrics["prune/latency_reduction"] = float(1.0 - last["latency_ratio"])
            if last.get("latency_error") is not None:
                metrics["prune/latency_error"] = float(last["latency_error"])
        if self.log_widths:
            metrics.update({f"prune/width/{name}": float(w) for name, w in last["widths_after"].items()})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)

    # -- inputs ------------------------------------------------------------------------------------------------
    def _latency_target(self, example: Any, pl_module: pl.LightningModule) -> LatencyTarget:
        """The event's latency target: timed on ``latency_input`` (default: the example input) on the module's
        device, with the table and ratio of earlier events (or of the checkpoint this fit resumed from)."""
        inputs = example if self.latency_input is None else _to_device(self.latency_input, pl_module.device)
        table = LatencyModel.from_dict(self.latency_table) if self.latency_table else None
        return LatencyTarget(inputs, self.latency_dtype, cache_dir=self.latency_cache, table=table,
                             ratio=self.latency_ratio, allocator_checked=self._allocator_checked)

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            from ..criteria.scoring import default_batch_fn

            loader = data_sources.train_dataloader(trainer)
            if loader is None:
                raise ValueError("PruneCallback needs an example input: set LightningModule.example_input_array, "
                                 "pass example_input=, or provide a train dataloader.")
            inputs, _ = (self.batch_fn or default_batch_fn)(next(iter(loader)))
            example = inputs[:2]
        example = _to_device(example, pl_module.device)
        self.example_shape = _shapes(example)
        return example


def _is_iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _check_example_input(example: Any) -> None:
    if example is None or isinstance(example, (torch.Tensor, dict)):
        return
    if isinstance(example, (tuple, list)) and example and all(isinstance(x, torch.Tensor) for x in example):
        return
    raise ArgumentTypeError(f"example_input must be a tensor, a tuple of tensors (positional inputs), a dict "
                            f"(keyword inputs) or None; got {type(example).__name__}.")


def _give_num_classes(criterion: Any, num_classes: int | None) -> None:
    """Class-discrimination criteria keep per-class state; with the number of classes known, that state has the
    same shape on every DDP rank. Walks wrappers (``Variety``) and blends."""
    if num_classes is None or criterion is None:
        return
    if hasattr(criterion, "num_classes") and getattr(criterion, "num_classes") is None:
        criterion.num_classes = int(num_classes)
    _give_num_classes(getattr(criterion, "base", None), num_classes)
    for member in getattr(criterion, "criteria", None) or []:
        _give_num_classes(member, num_classes)


def _shapes(example: Any) -> list[list[int]] | None:
    if isinstance(example, torch.Tensor):
        return [list(example.shape)]
    if isinstance(example, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in example):
        return [list(x.shape) for x in example]
    return None


def _zeros_like_shapes(shapes: list[list[int]] | None, module: torch.nn.Module) -> Any:
    if shapes is None:
        example = getattr(module, "example_input_array", None)
        if example is None:
            raise PruningError("The checkpoint holds a pruned model but no example input shape; set "
                               "LightningModule.example_input_array.")
        return example
    device = next(module.parameters()).device
    tensors = [torch.zeros(*shape, device=device) for shape in shapes]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _to_device(example: Any, device: torch.device) -> Any:
    from ..structure.tracing import move_to_device

    return move_to_device(example, device)


def load_pruned(module_class: type[pl.LightningModule], checkpoint_path: str, *, map_location: Any = "cpu",
                strict: bool = True, **kwargs: Any) -> pl.LightningModule:
    """Load a checkpoint written during pruned training into its pruned architecture, for inference.

    Constructs ``module_class`` from the checkpoint's hyper-parameters (``kwargs`` override them), rebuilds the
    pruned structure from the plan stored in the checkpoint, loads the weights and returns the module in eval
    mode. The checkpoint is read with ``torch.load(weights_only=True)``."""
    if not isinstance(module_class, type) or not issubclass(module_class, torch.nn.Module):
        raise TypeError(f"module_class must be a LightningModule class, got {module_class!r}.")
    checkpoint = read_checkpoint(checkpoint_path, map_location=map_location)
    # LightningCLI records how it instantiated the module under private keys; they are not constructor arguments.
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items()
               if k not in ("_instantiator", "_class_path")}
    hparams.update(kwargs)
    module = module_class(**hparams)
    saved = checkpoint.get(CHECKPOINT_KEY) or {}
    try:
        plan = PruningPlan.from_dict(saved.get("plan"))
    except InvalidPlanError as error:
        raise InvalidPlanError(f"checkpoint {checkpoint_path}: its pruning plan is invalid: {error}") from error
    if not plan.is_empty():
        with interop.eager_forward(module):  # a module that compiles its network in __init__
            apply_plan(module, plan, _zeros_like_shapes(saved.get("example_shape"), module))
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module.eval()


def _count_earlier_exclusions(graph: DependencyGraph, pl_module: pl.LightningModule, excluded: dict[str, str]) -> None:
    """Groups excluded in an earlier event are passed as ``ignore=`` (so the probe is not repeated), but they are
    still channels the library could not prune: record them as excluded so the target report counts them."""
    modules = dict(pl_module.named_modules())
    for name, reason in excluded.items():
        module = modules.get(name)
        width = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
        if isinstance(width, int) and name not in graph.excluded:
            graph.excluded[name] = reason
            graph.unprunable_widths[name] = (width, width)
