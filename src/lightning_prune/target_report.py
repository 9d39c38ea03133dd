"""Whether a pruning event reached its target, judged on the model as it is after the event, and why not.

``target_met`` is only True when the channel or FLOPs target was actually reached; a cap that stopped it
(``max_group_sparsity``, ``round_to``, groups excluded because their removal breaks the model, ops whose channels
cannot be followed, ignored modules, nothing prunable at all) is named in the warning. Kept apart from the event
pipeline (:mod:`lightning_prune.pruning`) so that any allocation strategy reports the same way.
"""
from __future__ import annotations

import warnings
from typing import Any

from .allocation import min_width


def assess_target(graph: Any, target: float, target_kind: str, *, flops_after: float, original_flops: float | None,
                  max_group_sparsity: float, round_to: int | None,
                  latency_ratio: float | None = None) -> tuple[bool, float, str | None]:
    """``(met, reached, why_not)``: ``reached`` is the channel sparsity (``target_kind="channels"``) or the FLOPs
    reduction vs the original model; ``why_not`` is None when met, else a sentence naming the caps."""
    if target_kind == "channels":
        # Groups the library had to leave unpruned (excluded, unmappable) count as unremoved channels: a target
        # is not met by pruning only what was left.
        original = _channel_totals(graph)[1]
        reached = graph.channel_sparsity(include_unprunable=True)
        # One channel of slack: no removal lands closer when the target falls between two channel counts.
        met = target <= 0 or (bool(original) and reached >= target - 1.0 / original - 1e-9)
    elif target_kind == "latency":  # measured: met within the timing tolerance of allocation.latency
        from .allocation.latency import TOLERANCE

        reached = 1.0 - latency_ratio if latency_ratio is not None else 0.0
        met = target <= 0 or (latency_ratio is not None and latency_ratio <= (1 - target) * (1 + TOLERANCE))
    else:
        reached = 1.0 - flops_after / original_flops if original_flops else 0.0
        met = target <= 0 or (bool(original_flops) and flops_after <= original_flops * (1 - target) * 1.001)
    if met:
        return True, reached, None
    return False, reached, f"The {target_kind} target {target:.1%} was reached only to {reached:.1%} (target_met=False). " + \
        _caps(graph, graph.groups, target_kind, max_group_sparsity, round_to)


def _caps(graph: Any, groups: list, target_kind: str, max_group_sparsity: float, round_to: int | None) -> str:
    causes = []
    auto = round_to == "auto"  # per-group steps read from the latency table: no single floor to check here
    if auto:
        round_to = None
    excluded = dict(getattr(graph, "excluded", {}) or {})
    unmappable = dict(getattr(graph, "unmappable", {}) or {})
    frozen = list(getattr(graph, "frozen_ops", []) or [])
    if not groups:
        causes.append("nothing is prunable: the model has no prunable channel group (every conv/linear producer is "
                      "ignored, excluded, behind an op whose channels cannot be followed, or feeds the model's "
                      "output, which protect_outputs keeps)")
    else:
        # A group at its floor because of max_group_sparsity alone, or only because round_to raised the floor.
        by_sparsity = [g.name for g in groups if g.size <= min_width(g, max_group_sparsity, None)]
        by_rounding = [g.name for g in groups if g.name not in by_sparsity
                       and g.size <= min_width(g, max_group_sparsity, round_to)]
        if by_sparsity:
            every = "every prunable group is" if len(by_sparsity) == len(groups) else \
                f"{len(by_sparsity)} of {len(groups)} groups are"
            causes.append(f"max_group_sparsity={max_group_sparsity}: {every} at the minimum width it allows")
        if auto:
            causes.append("widths are kept on the block sizes the latency table measured (round_to='auto'; "
                          "round_to=None reaches a target more closely)")
        if round_to:
            extra = f", {len(by_rounding)} group(s) at a floor rounded up to it" if by_rounding else ""
            causes.append(f"widths are rounded to multiples of round_to={round_to}{extra} (round_to=None reaches a "
                          "target more closely)")
    if excluded:
        causes.append(f"{len(excluded)} group(s) excluded because removing their channels breaks the model "
                      f"({', '.join(sorted(excluded)[:5])})")
    if unmappable:
        causes.append(f"{len(unmappable)} group(s) unmappable (their channels cannot be followed through an op: "
                      f"{', '.join(sorted(unmappable)[:5])})")
    share = _unprunable_share(graph)
    if share:
        causes.append(f"the groups left unpruned hold {share:.1%} of the channels, and they count against the "
                      "target as unremoved")
    if frozen:
        causes.append(f"groups through {len(frozen)} frozen op(s) are never pruned ({', '.join(frozen[:3])})")
    if target_kind == "flops" and getattr(graph, "ignored", None):
        causes.append("FLOPs of ignored modules (ignore=) and of the protected output layer cannot be removed")
    if not causes:
        causes.append("the allocation stopped before the target (no further removal was admissible)")
    return "Capped by: " + "; ".join(causes) + "."


def _channel_totals(graph: Any) -> tuple[int, int]:
    """``(original channels of the groups left unpruned, original channels of all groups)``."""
    unprunable = dict(getattr(graph, "unprunable_widths", {}) or {})
    held = sum(o for o, _ in unprunable.values())
    return held, held + sum(graph.original_widths().values())


def _unprunable_share(graph: Any) -> float:
    held, total = _channel_totals(graph)
    return held / total if total else 0.0


def check_target(graph: Any, target: float, target_kind: str, flops_after: float, original_flops: float | None,
                 max_group_sparsity: float, round_to: int | None, stop_reason: str | None = None,
                 latency_ratio: float | None = None) -> bool:
    """:func:`assess_target`, warning (naming the caps, and ``stop_reason`` when the allocation stopped early, e.g.
    at ``max_rounds``) when the target was not met. Returns ``met``."""
    met, _, why_not = assess_target(graph, target, target_kind, flops_after=flops_after,
                                    original_flops=original_flops, max_group_sparsity=max_group_sparsity,
                                    round_to=round_to, latency_ratio=latency_ratio)
    if not met:
        warnings.warn(f"{why_not} Stopped early: {stop_reason}." if stop_reason else why_not, stacklevel=3)
    return met
