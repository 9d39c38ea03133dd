"""The criterion interface and the registry of criteria by name.

A criterion scores the channels of a :class:`~lightning_prune.structure.ChannelGroup`: one float per channel,
higher = more important (kept). Weight criteria read the group's weights. Data-driven criteria also declare what
they need (``requires_data``, ``requires_gradients``, ``requires_labels``) and accumulate **sum-reducible state**
(counts, sums, sums of squares) through :meth:`Criterion.observe`, so scoring streams over any number of batches
in bounded memory and DDP can all-reduce the state before :meth:`Criterion.score` (the torchmetrics pattern).

Criteria are looked up by name (``get("l2")``, ``get("l1+variety")``; ``+wrapper`` suffixes wrap the base
criterion), and users add their own with ``@register("name")``.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Sequence

import torch

from ..structure import ChannelGroup, GroupMember

COMBINE_MODES = ("mean", "sum", "max", "first")


class Criterion:
    """Base class: subclasses implement :meth:`score` (and, when data-driven, :meth:`observe`).

    Args:
        combine: how the scores of a coupled group's members (several producers across a residual add, several
            consumers of the same channels) become one score per channel: ``"mean"`` (default) of per-member
            scores each normalized by its mean magnitude, so members of different scale count equally; ``"sum"``
            and ``"max"`` of the normalized scores; ``"first"`` uses the group's first member only.
    """

    name: str = "criterion"
    requires_data: bool = False
    requires_gradients: bool = False
    requires_labels: bool = False

    def __init__(self, combine: str = "mean"):
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine={combine!r} is not supported; accepted values: {', '.join(map(repr, COMBINE_MODES))}.")
        self.combine = combine
        self._state: dict[str, torch.Tensor] = {}

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, group: ChannelGroup) -> torch.Tensor:
        """One score per channel of ``group`` (shape ``[group.size]``, float), higher = keep."""
        raise NotImplementedError

    #: True for criteria that tune themselves on held-out data at the event's removal counts (Blend's weight
    #: search): the allocation strategy then calls :meth:`calibrate` before deciding with the new scores.
    calibrates_on_validation: bool = False

    def calibrate(self, graph: Any, evaluate: Callable[[], float], removal_counts: dict[str, int], *,
                  collective: Any = None) -> Any:
        """Tune the criterion on held-out data (``evaluate()``) for removing ``removal_counts`` channels per group
        (only called when ``calibrates_on_validation``)."""
        raise NotImplementedError

    # -- data-driven protocol ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget accumulated statistics (called before every scoring pass)."""
        self._state = {}

    def observe(
        self,
        group: ChannelGroup,
        site: str,
        activation: torch.Tensor,
        gradient: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Accumulate statistics of one batch.

        ``activation`` is the tensor feeding consumer ``site`` (a module name), with its channels already put in
        the group's numbering: shape ``[N, group.size, *spatial]``. ``gradient`` is d(loss)/d(activation) of the
        same shape when ``requires_gradients``; ``labels`` the batch's class labels when ``requires_labels``.
        """

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulated statistics: tensors whose element-wise sum over data shards equals the statistics
        of the union of the shards (what DDP all-reduces)."""
        return dict(self._state)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._state = dict(state)

    def accumulate(self, key: str, value: torch.Tensor) -> None:
        """Add ``value`` to state tensor ``key`` (float64, on CPU-or-device of ``value``)."""
        value = value.detach().to(torch.float64)
        current = self._state.get(key)
        self._state[key] = value.clone() if current is None else current + value

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WrappedCriterion(Criterion):
    """A criterion that transforms the scores of ``base`` (``"<base>+<wrapper>"`` names): it forwards the
    data-driven protocol (``requires_*``, ``reset``, ``observe``, ``state``, ``load_state``) to ``base``, so
    wrapping a data-driven criterion scores like it does. Subclasses implement :meth:`transform`."""

    suffix = "wrapped"

    def __init__(self, base: "Criterion | str"):
        super().__init__()
        self.base = get(base)
        self.name = f"{self.base.name}+{self.suffix}"
        self.combine = self.base.combine

    @property
    def requires_data(self) -> bool:  # type: ignore[override]
        return bool(self.base.requires_data)

    @property
    def requires_gradients(self) -> bool:  # type: ignore[override]
        return bool(self.base.requires_gradients)

    @property
    def requires_labels(self) -> bool:  # type: ignore[override]
        return bool(self.base.requires_labels)

    def reset(self) -> None:
        self.base.reset()

    def observe(self, group, site, activation, gradient=None, labels=None) -> None:
        self.base.observe(group, site, activation, gradient=gradient, labels=labels)

    def state(self) -> dict[str, torch.Tensor]:
        return self.base.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state(state)

    def score(self, group: ChannelGroup) -> torch.Tensor:
        return self.transform(group, self.base.score(group).to(torch.float64))

    def transform(self, group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"


def combine_scores(per_member: Sequence[torch.Tensor], mode: str = "mean") -> torch.Tensor:
    """Combine per-member channel scores (each ``[size]``) of one group into one score per channel.

    Each member's scores are divided by their mean magnitude (so a wide layer does not outvote a narrow one),
    combined, and multiplied back by the members' average magnitude: the result stays on the criterion's own
    scale, comparable with single-member groups when one threshold is applied to the whole network (global
    allocation, paper 1's global-pruning analysis)."""
    if not per_member:
        raise ValueError("no member scores to combine")
    if mode == "first" or len(per_member) == 1:
        return per_member[0].to(torch.float64)
    normalized, scales = [], []
    for scores in per_member:
        scores = scores.to(torch.float64)
        scale = scores.abs().mean()
        normalized.append(scores / scale if scale > 0 else scores)
        if scale > 0:
            scales.append(scale)
    stacked = torch.stack(normalized)
    if mode == "sum":
        combined = stacked.sum(0)
    elif mode == "max":
        combined = stacked.max(0).values
    else:
        combined = stacked.mean(0)
    return combined * torch.stack(scales).mean() if scales else combined


def scatter_to_channels(member: GroupMember, values: torch.Tensor, size: int, reduce: str = "mean") -> torch.Tensor:
    """Per-position values of a member → per-channel values (a flattened Linear reads a channel at several
    positions; they are averaged, or summed with ``reduce="sum"``)."""
    values = values.to(torch.float64)
    out = torch.zeros(size, dtype=torch.float64, device=values.device)
    out.index_add_(0, member.channels.to(values.device), values)
    if reduce == "mean":
        counts = torch.zeros(size, dtype=torch.float64, device=values.device)
        counts.index_add_(0, member.channels.to(values.device), torch.ones_like(values))
        out = out / counts.clamp_min(1)
    return out


# -- registry --------------------------------------------------------------------------------------------------
_CRITERIA: dict[str, Callable[..., Criterion]] = {}
_WRAPPERS: dict[str, Callable[..., Criterion]] = {}


def register(name: str, *, wrapper: bool = False) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Register a criterion factory (a class or function returning a :class:`Criterion`) under ``name``.

    With ``wrapper=True`` the factory takes the wrapped criterion as first argument and is reachable as a
    ``+name`` suffix (``"l1+variety"``)."""

    def decorator(factory: Callable[..., Criterion]) -> Callable[..., Criterion]:
        table = _WRAPPERS if wrapper else _CRITERIA
        key = name.lower()
        if key in table and table[key] is not factory:
            raise ValueError(f"criterion name {name!r} is already registered")
        table[key] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Names accepted by :func:`get` (wrappers are listed as ``+name``)."""
    _load_builtin()
    return sorted(_CRITERIA) + sorted(f"+{w}" for w in _WRAPPERS)


def get(spec: str | Criterion, **kwargs: Any) -> Criterion:
    """A criterion from a name (``"l2"``, ``"sd"``, ``"l1+variety"``) or a :class:`Criterion` instance.

    ``kwargs`` go to the base criterion's constructor."""
    if isinstance(spec, Criterion):
        if kwargs:
            raise ValueError("criterion: keyword arguments are only accepted with a criterion name")
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"criterion must be a name or a lightning_prune.criteria.Criterion instance, got {type(spec).__name__}"
        )
    _load_builtin()
    base_name, *wrappers = [part.strip().lower() for part in spec.split("+")]
    _check_name(base_name, _CRITERIA, spec)
    for wrapper in wrappers:
        _check_name(wrapper, _WRAPPERS, spec, prefix="+")
    criterion = _CRITERIA[base_name](**kwargs)
    for wrapper in wrappers:
        criterion = _WRAPPERS[wrapper](criterion)
    return criterion


def _check_name(name: str, table: dict, spec: str, prefix: str = "") -> None:
    if name not in table:
        names = [prefix + n for n in sorted(table)]
        close = difflib.get_close_matches(prefix + name, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"criterion={spec!r}: unknown {'wrapper' if prefix else 'criterion'} {prefix + name!r}; "
                         f"accepted values: {', '.join(map(repr, names))}.{hint}")


def _load_builtin() -> None:
    # Importing the modules registers their criteria; done lazily to keep imports one-directional.
    from . import builtin  # noqa: F401


def requires(criterion: Criterion, what: Iterable[str] = ("data", "gradients", "labels")) -> dict[str, bool]:
    return {w: bool(getattr(criterion, f"requires_{w}", False)) for w in what}
