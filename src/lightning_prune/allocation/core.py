"""How many channels each group loses, and which: uniform (layerwise) and global allocation.

Both work on cumulative **channel sparsity** relative to the groups' ORIGINAL widths
(``ChannelGroup.original_size``): calling :func:`allocate` again on an already pruned model with a larger target
returns only what is still missing, and never asks to restore a channel.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import check_choice
from ..structure import ChannelGroup, DependencyGraph

ALLOCATIONS = ("uniform", "global", "sensitivity")

_EPS = 1e-9


def _half_up(x: float) -> int:
    """Round half up, with a tolerance for float noise (``10 * (1 - 0.7) == 3.0000000000000004``)."""
    return int(math.floor(x + 0.5 + _EPS))


def _step(round_to: int | None, divisions: int) -> int:
    """The width granularity: widths are multiples of ``lcm(round_to, divisions)``."""
    return math.lcm(int(round_to), int(divisions)) if round_to else int(divisions)


def round_width(width: float, round_to: int | None = None, *, divisions: int = 1, maximum: int | None = None) -> int:
    """The admissible channel width nearest to ``width`` (rounded half up, i.e. toward keeping more).

    Widths are multiples of ``lcm(round_to, divisions)`` (``divisions``: the chunks of a grouped convolution,
    which lose the same positions together) and at least one such step. When ``maximum`` is given and the
    rounded width exceeds it (a group too narrow for ``round_to``), the ``round_to`` constraint is dropped
    "where not possible" and the width is rounded to a multiple of ``divisions`` in ``[divisions, maximum]``.
    Never returns less than ``divisions``.
    """
    divisions = max(int(divisions), 1)
    step = _step(round_to, divisions)
    w = max(step * _half_up(float(width) / step), step)
    if maximum is not None and w > maximum:
        w = max(divisions * _half_up(float(width) / divisions), divisions)
        w = min(w, max(divisions, (int(maximum) // divisions) * divisions))
    return int(w)


def _check_target(target: object) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ValueError(
            f"amount (the target channel sparsity, `target`) must be a number in [0, 1), got {target!r}."
        )
    return float(target)


def _check_round_to(round_to: object) -> int | None:
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be None or an integer >= 1, got {round_to!r}.")
    return None if round_to == 1 else int(round_to)


def _check_max_group_sparsity(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"max_group_sparsity must be a number in (0, 1], got {value!r}.")
    return float(value)


def _as_groups(groups: DependencyGraph | Iterable[ChannelGroup]) -> list[ChannelGroup]:
    if isinstance(groups, DependencyGraph):
        return groups.groups
    result = list(groups)
    for g in result:
        if not isinstance(g, ChannelGroup):
            raise TypeError(f"groups must be a DependencyGraph or ChannelGroup objects, got {type(g).__name__}")
    return result


def _checked_scores(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError("scores must map group names to one score per channel")
    result = {}
    for g in groups:
        if g.name not in scores:
            raise ValueError(f"scores: no scores for group {g.name!r}; every group to allocate needs scores.")
        s = torch.as_tensor(scores[g.name], dtype=torch.float64).detach().flatten().cpu()
        if s.numel() != g.size:
            raise ValueError(f"scores for group {g.name!r} have {s.numel()} values, expected {g.size}.")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores for group {g.name!r} contain NaN or infinite values.")
        result[g.name] = s
    return result


def _floor_width(group: ChannelGroup, max_group_sparsity: float, step: int) -> int:
    """Smallest width the group may be left with: ``max(min_size, ceil(original * (1 - max_group_sparsity)))``,
    rounded up to a multiple of ``step`` where that is still within the current width (else of divisions)."""
    div = max(group.divisions, 1)
    floor = max(group.min_size, math.ceil(group.original_size * (1.0 - max_group_sparsity) - _EPS), 1)
    rounded = step * math.ceil(floor / step)
    if rounded > group.size:
        rounded = div * math.ceil(floor / div)
    return int(rounded)


def min_width(group: ChannelGroup, max_group_sparsity: float, round_to: int | None = None) -> int:
    """The narrowest width uniform and global allocation leave ``group`` with."""
    return _floor_width(group, max_group_sparsity, _step(round_to, group.divisions))


def _nearest_admissible(group: ChannelGroup, width: int, step: int, floor: int) -> int:
    """Nearest to ``width`` among the multiples of ``step`` in ``[floor, size]`` and ``size`` itself (no removal);
    ties go to the wider. A group narrower than ``step`` keeps ``width`` (already a multiple of divisions)."""
    candidates = [m for m in range(step, group.size + 1, step) if m >= floor] + [group.size]
    if group.size < step:
        return max(width, floor)
    return min(candidates, key=lambda c: (abs(c - width), -c))


def _unit_order(group: ChannelGroup, scores: torch.Tensor) -> list[tuple[float, int]]:
    """(score, position) of the group's removal units, lowest first, the order :meth:`ChannelGroup.lowest`
    uses: one unit is one position in every grouped-conv chunk (``divisions`` channels)."""
    per_chunk = scores.view(group.divisions, -1).mean(0)
    order = sorted(range(per_chunk.numel()), key=lambda i: (float(per_chunk[i]), i))
    return [(float(per_chunk[i]), i) for i in order]


def allocate(
    groups: DependencyGraph | Iterable[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    target: float,
    *,
    allocation: str = "uniform",
    round_to: int | None = None,
    max_group_sparsity: float = 0.9,
) -> dict[str, list[int]]:
    """Channel indices to remove from each group so that the cumulative channel sparsity reaches ``target``.

    Args:
        groups: a :class:`DependencyGraph` or its :class:`ChannelGroup` objects (possibly already pruned).
        scores: one score per current channel of every group (higher = keep).
        target: cumulative channel sparsity in ``[0, 1)`` relative to the ORIGINAL widths. What was already
            removed counts; nothing is ever un-pruned (a group already narrower than its target loses nothing).
        allocation: ``"uniform"`` (layerwise: every group keeps ``round_width(original * (1 - target))``
            channels, its lowest-scored removed) or ``"global"`` (one threshold over all groups' raw scores:
            the lowest-scored channels of the whole network are removed until ``round(target * Σ original)``
            channels are gone in total). ``"sensitivity"`` needs data: use :class:`SensitivityAllocator`.
        round_to: remaining widths are multiples of ``round_to`` where possible (hardware-friendly widths);
            never below one step, and a group too narrow for it is rounded to its ``divisions`` only.
        max_group_sparsity: cap on any group's cumulative sparsity: a group keeps at least
            ``max(min_size, ceil(original * (1 - max_group_sparsity)))`` channels. [design] The cap applies to
            both allocations (it only binds uniform allocation when ``target > max_group_sparsity``).

    Returns:
        ``{group name: sorted indices to remove}`` for the groups that lose channels (indices in the group's
        current numbering; pass it to :meth:`DependencyGraph.prune_groups`). Ties are broken deterministically:
        lower channel index first within a group, then module order across groups (global).

    With ``"global"`` and ``round_to``, per-group counts are rounded to the nearest admissible width and then
    topped up (cheapest next step by mean score first) until the target is reached, so the result may overshoot
    the target by less than one step; groups at their cap may leave the target unreachable (then as much as the
    caps allow is removed).
    """
    if allocation == "sensitivity":
        raise ValueError(
            "allocation='sensitivity' needs a validation metric and FLOPs counts, which allocate() does not "
            "have: use lightning_prune.allocation.SensitivityAllocator (its step() or plan_to_flops()) instead."
        )
    check_choice("allocation", allocation, ALLOCATIONS)
    target = _check_target(target)
    round_to = _check_round_to(round_to)
    max_group_sparsity = _check_max_group_sparsity(max_group_sparsity)
    groups = _as_groups(groups)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError("groups: group names must be unique")
    checked = _checked_scores(groups, scores)
    if allocation == "uniform":
        counts = _uniform_counts(groups, target, round_to, max_group_sparsity)
    else:
        counts = _global_counts(groups, checked, target, round_to, max_group_sparsity)
    return {g.name: g.lowest(checked[g.name], counts[g.name]) for g in groups if counts.get(g.name, 0) > 0}


def _uniform_counts(groups: Sequence[ChannelGroup], target: float, round_to: int | None,
                    max_group_sparsity: float) -> dict[str, int]:
    counts = {}
    for g in groups:
        step = _step(round_to, g.divisions)
        width = round_width(g.original_size * (1.0 - target), round_to, divisions=g.divisions, maximum=g.size)
        width = max(width, _floor_width(g, max_group_sparsity, step))
        if width % g.divisions:
            width = g.divisions * math.ceil(width / g.divisions)
        counts[g.name] = max(0, g.size - width)
    return counts


def _global_counts(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor], target: float,
                   round_to: int | None, max_group_sparsity: float) -> dict[str, int]:
    original_total = sum(g.original_size for g in groups)
    already = original_total - sum(g.size for g in groups)
    needed = _half_up(target * original_total) - already
    counts = {g.name: 0 for g in groups}
    if needed <= 0:
        return counts
    floors = {g.name: _floor_width(g, max_group_sparsity, _step(round_to, g.divisions)) for g in groups}
    orders = {g.name: _unit_order(g, scores[g.name]) for g in groups}

    # One threshold over all raw scores: walk every removal unit in ascending score order (ties: module order,
    # then position) and take it while its group is above its floor.
    units = sorted(
        ((score, gi, rank) for gi, g in enumerate(groups) for rank, (score, _) in enumerate(orders[g.name])),
        key=lambda u: (u[0], u[1], u[2]),
    )
    total = 0
    for _, gi, _ in units:
        if total >= needed:
            break
        g = groups[gi]
        if g.size - counts[g.name] - g.divisions < floors[g.name]:
            continue
        counts[g.name] += g.divisions
        total += g.divisions

    if round_to is None:
        return counts

    # Round every touched group's width to the nearest admissible width, then top up the shortfall.
    for g in groups:
        if counts[g.name] == 0:
            continue
        counts[g.name] = g.size - _nearest_admissible(g, g.size - counts[g.name], _step(round_to, g.divisions),
                                                      floors[g.name])
    total = sum(counts.values())
    while total < needed:
        best = None
        for gi, g in enumerate(groups):
            width = g.size - counts[g.name]
            step = _step(round_to, g.divisions)
            lower = step * ((width - 1) // step)
            if lower < floors[g.name] or lower <= 0:
                continue
            ranks = range(counts[g.name] // g.divisions, (g.size - lower) // g.divisions)
            mean_score = sum(orders[g.name][r][0] for r in ranks) / max(len(ranks), 1)
            key = (mean_score, gi)
            if best is None or key < best[0]:
                best = (key, g, g.size - lower)
        if best is None:
            break
        _, g, new_count = best
        total += new_count - counts[g.name]
        counts[g.name] = new_count
    return counts
