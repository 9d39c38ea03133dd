"""The scoring driver: turn a criterion (and, for data-driven ones, batches of data) into channel scores.

Used by the pruning callback and by the one-shot API. Data-driven criteria see, through forward pre-hooks, the
input of every consumer of a group (the tensor the group's channels feed), reordered into the group's channel
numbering ``[N, size, *spatial]``; gradients come from ``torch.autograd.grad`` with respect to those inputs, so
parameter ``.grad`` and the optimizer are never touched. Statistics are streamed batch by batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NonFiniteScoresError
from ..structure import ChannelGroup, GroupMember
from ..structure.tracing import call_model, move_to_device
from .base import Criterion, get

INPUT_KEYS = ("input", "inputs", "x", "image", "images")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def default_batch_fn(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(x, y)`` / ``[x, y, ...]`` → ``(x, y)``; a dict → its ``input``/``x``/``image`` and ``label``/``y``/``target``
    entries; a bare tensor → ``(x, None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        if inputs is None:
            raise ValueError(
                f"batch_fn: cannot find the inputs in a dict batch with keys {sorted(batch)}; accepted keys: "
                f"{', '.join(INPUT_KEYS)} (or pass batch_fn=lambda batch: (inputs, labels))."
            )
        return inputs, next((batch[k] for k in LABEL_KEYS if k in batch), None)
    if isinstance(batch, (list, tuple)):
        if len(batch) == 0:
            raise ValueError("batch_fn: empty batch")
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ValueError(
        f"batch_fn: cannot split a batch of type {type(batch).__name__} into inputs and labels; pass "
        "batch_fn=lambda batch: (inputs, labels)."
    )


def default_loss_fn(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Sum-reduced cross-entropy on the first output tensor: the gradient of a sample does not depend on the
    rest of its batch, so scores do not depend on the batch size."""
    logits = _first_tensor(outputs)
    if logits is None:
        raise ValueError("loss_fn: the model's output contains no tensor; pass loss_fn=...")
    return F.cross_entropy(logits, labels.to(logits.device), reduction="sum")


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
        return None
    logits = getattr(value, "logits", None)  # e.g. Hugging Face / torchvision named outputs
    return logits if isinstance(logits, torch.Tensor) else None


class _Reorder:
    """Gathers a member's positions from a tensor and puts them in the group's channel numbering."""

    def __init__(self, member: GroupMember, size: int, channel_axis_last: bool):
        positions, channels = member.positions, member.channels
        key = channels * (int(positions.max()) + 1 if positions.numel() else 1) + positions
        order = torch.argsort(key)
        self.positions = positions[order]
        counts = torch.bincount(channels, minlength=size)
        self.reps = int(counts[0]) if counts.numel() else 0
        if self.reps == 0 or bool((counts != self.reps).any()):
            raise ValueError(
                f"member {member.module_name!r} reads the channels of its group an unequal number of times "
                f"({counts.tolist()[:8]}...); its activations cannot be scored per channel"
            )
        self.size = size
        self.last = channel_axis_last
        self._device_positions: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        positions = self._device_positions.get(x.device)
        if positions is None:
            positions = self._device_positions.setdefault(x.device, self.positions.to(x.device))
        if self.last:  # Linear: [N, *, F] -> [N, P, *]
            x = x.index_select(-1, positions)
            x = x.movedim(-1, 1) if x.dim() > 2 else x
        else:
            x = x.index_select(1, positions)
        n = x.shape[0]
        if self.reps == 1:
            return x
        # channel-major blocks (a flatten before a Linear): the repeats become the channel's spatial positions
        return x.reshape(n, self.size, -1)


class _Sites:
    """Hooks on the consumer (or producer) modules of the groups, feeding one batch at a time."""

    def __init__(self, groups: Sequence[ChannelGroup], need_grad: bool):
        self.need_grad = need_grad
        self.entries: dict[int, tuple[nn.Module, str, str, list[tuple[ChannelGroup, _Reorder]]]] = {}
        for group in groups:
            members, where = group.consumers, "input"
            if not members:
                members, where = group.producers, "output"
            if not members:
                raise ValueError(f"group {group.name!r} has neither consumers nor producers to observe")
            for member in members:
                reorder = _Reorder(member, group.size, channel_axis_last=member.is_linear)
                key = (id(member.module), where)
                entry = self.entries.setdefault(key, (member.module, member.module_name, where, []))
                entry[3].append((group, reorder))
        self.criterion: Criterion | None = None
        self.labels: torch.Tensor | None = None
        self.captured: list[tuple[str, list[tuple[ChannelGroup, _Reorder]], torch.Tensor]] = []
        self.handles: list[Any] = []

    def _take(self, site: str, targets, x: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(x, torch.Tensor):
            return None
        if self.need_grad:
            if not x.requires_grad:
                x = x.detach().requires_grad_()
            # A distinct autograd node per site: its gradient is the gradient through this consumer only,
            # which is the first-order effect of disconnecting the channels there.
            x = x.view_as(x)
            self.captured.append((site, targets, x))
            return x
        for group, reorder in targets:
            self.criterion.observe(group, site, reorder(x.detach()), None, self.labels)
        return None

    def install(self) -> None:
        for module, site, where, targets in self.entries.values():
            if where == "input":
                def pre_hook(mod, args, site=site, targets=targets):
                    if not args:
                        return None
                    new = self._take(site, targets, args[0])
                    return None if new is None else (new, *args[1:])

                self.handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(mod, args, output, site=site, targets=targets):
                    return self._take(site, targets, output)

                self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def score_groups(
    model: nn.Module,
    groups: Iterable[ChannelGroup] | Any,
    criterion: Criterion | str,
    dataloader: Iterable | None = None,
    *,
    scoring_batches: int | None = None,
    batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    reduce_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Score every channel of ``groups`` with ``criterion``: ``{group name: scores[size]}``, higher = keep.

    Args:
        model: the network the groups belong to.
        groups: channel groups (or a :class:`~lightning_prune.structure.DependencyGraph`, meaning all its groups).
        criterion: a :class:`Criterion` or a name accepted by :func:`~lightning_prune.criteria.get`.
        dataloader: batches for data-driven criteria (ignored by weight criteria).
        scoring_batches: number of batches to use (``None`` = all of ``dataloader``).
        batch_fn: ``batch -> (inputs, labels)``; default :func:`default_batch_fn`. Inputs may be a tensor, a
            tuple (positional arguments) or a dict (keyword arguments).
        loss_fn: ``loss_fn(outputs, labels)`` for criteria that need gradients; default sum-reduced
            cross-entropy on the first output tensor. Prefer a sum-reduced loss so that scores do not depend on
            the batch size.
        device: where to run; default the device of the model's first parameter.
        reduce_state: called once with the criterion's accumulated state after all batches and before scoring;
            returns the reduced state (DDP: all-reduce by sum).

    The model runs in eval mode; every module's train/eval flag is restored afterwards, also on error. No
    optimizer step happens and parameter ``.grad`` is left untouched. Only one batch of activations is alive at
    a time.
    """
    criterion = get(criterion)
    groups = list(groups.groups if hasattr(groups, "groups") else groups)
    if not criterion.requires_data:
        return {g.name: _checked(criterion, g) for g in groups}

    what = getattr(criterion, "name", type(criterion).__name__)
    if dataloader is None:
        raise ValueError(f"dataloader is required: criterion {what!r} is data-driven (it scores activations).")
    if scoring_batches is not None and (
        isinstance(scoring_batches, bool) or not isinstance(scoring_batches, int) or scoring_batches < 1
    ):
        raise ValueError(f"scoring_batches must be None (all batches) or an integer >= 1, got {scoring_batches!r}")
    batch_fn = batch_fn or default_batch_fn
    need_grad = bool(criterion.requires_gradients)
    need_labels = bool(criterion.requires_labels) or (need_grad and loss_fn is None)
    loss_fn = loss_fn or default_loss_fn
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")

    sites = _Sites(groups, need_grad)
    sites.criterion = criterion
    criterion.reset()
    batches = 0
    with _eval_mode(model):
        sites.install()
        try:
            for batch in dataloader:
                if scoring_batches is not None and batches >= scoring_batches:
                    break
                inputs, labels = batch_fn(batch)
                if need_labels and labels is None:
                    reason = "its statistics are per class" if criterion.requires_labels else "the default loss"
                    raise ValueError(
                        f"criterion {what!r} needs class labels ({reason}), but the batch has none: make the "
                        "dataloader yield (inputs, labels) or pass batch_fn=lambda batch: (inputs, labels)"
                        + ("" if criterion.requires_labels else " or a loss_fn that needs no labels") + "."
                    )
                inputs = move_to_device(inputs, torch.device(device))
                labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels
                sites.labels = labels
                if need_grad:
                    _observe_with_gradients(model, inputs, labels, loss_fn, sites, criterion)
                else:
                    with torch.no_grad():
                        call_model(model, inputs)
                batches += 1
        finally:
            sites.remove()
            sites.captured = []
            sites.labels = None
    if batches == 0:
        raise ValueError(f"dataloader yielded no batches: criterion {what!r} needs data to score.")
    if reduce_state is not None:
        criterion.load_state(reduce_state(criterion.state()))
    return {g.name: _checked(criterion, g) for g in groups}


def _observe_with_gradients(model, inputs, labels, loss_fn, sites: _Sites, criterion: Criterion) -> None:
    sites.captured = []
    try:
        with torch.enable_grad():
            outputs = call_model(model, inputs)
            if not sites.captured:
                return
            loss = loss_fn(outputs, labels)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar tensor")
            tensors = [x for _, _, x in sites.captured]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            else:
                grads = [None] * len(tensors)
        for (site, targets, x), grad in zip(sites.captured, grads):
            value = x.detach()
            grad = torch.zeros_like(value) if grad is None else grad
            for group, reorder in targets:
                criterion.observe(group, site, reorder(value), reorder(grad), labels)
    finally:
        sites.captured = []


def _checked(criterion: Criterion, group: ChannelGroup) -> torch.Tensor:
    scores = torch.as_tensor(criterion.score(group))
    if scores.shape != (group.size,):
        raise ValueError(
            f"criterion {getattr(criterion, 'name', criterion)!r} returned {tuple(scores.shape)} scores for group "
            f"{group.name!r}; expected ({group.size},)"
        )
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteScoresError(
            f"criterion {getattr(criterion, 'name', criterion)!r} gave {bad} NaN or infinite score(s) for group "
            f"{group.name!r}: the weights, activations or scoring data are not finite. Nothing was pruned."
        )
    return scores
