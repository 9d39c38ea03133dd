"""What removing a group's channels really does to each coupled module, and whether a group's mapping is sound.

Torch-Pruning maps a group's channel numbers (the positions of its root module) onto every coupled module. Two
things follow from that mapping that the group's channel count alone does not show:

* **Tied channels.** In a ghost block (``cat([primary(x), cheap(primary(x))])`` added to a residual) channel ``j``
  and ``j + 8`` of a 16-channel group are read and written by the same filter ``j`` of the 8-channel primary conv:
  removing either removes both. :func:`tied_classes` finds such channels (they share a position of some member),
  so a removal is expanded to what surgery really removes and counted that way.
* **Narrow members.** The primary conv has 8 positions for 16 channels: removing 8 channels may remove all of
  its filters. :func:`member_shortfalls` says which members a removal would cut below their minimum width.

:func:`mapping_problem` rejects groups whose mapping cannot be right (positions beyond a module's width, a producer
only partly covered): Torch-Pruning 1.6 mis-maps some ``torch.split``/``chunk``/``split_with_sizes`` and slicing
patterns (res2net, dpn, CSP, mixnet). Such a group is left unpruned rather than pruned wrongly.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

_CONV = nn.modules.conv._ConvNd
_OPS_OF_INTEREST = ("_SplitOp", "_ConcatOp", "_SliceOp", "_ReshapeOp", "_UnbindOp", "_ExpandOp")


def member_width(member: Any) -> int | None:
    """The module's full channel count on the member's axis (not just the positions this group maps)."""
    m, out = member.module, member.kind == "out"
    if isinstance(m, _CONV):
        return m.out_channels if out else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    for attribute in ("num_features", "num_channels"):
        if isinstance(getattr(m, attribute, None), int):
            return getattr(m, attribute)
    return None


def member_minimum(member: Any) -> int:
    """Fewest channels the module may keep on that axis: one, or one per group of a grouped (not depthwise) conv."""
    m = member.module
    if isinstance(m, _CONV) and m.groups > 1 and not member.is_depthwise:
        return int(m.groups)
    return 1


def _key(member: Any) -> tuple[int, str]:
    return id(member.module), member.kind


def tied_classes(members: Sequence[Any], size: int) -> list[int]:
    """``classes[c]``: the smallest channel tied to channel ``c`` (channels sharing a position of any member are
    removed together, transitively). All ``classes[c] == c`` for an ordinary group."""
    if not listing_shape(members, size)[0]:
        return list(range(size))
    parent = list(range(size))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    first_at: dict[tuple[int, str, int], int] = {}
    for member in members:
        key = _key(member)
        for position, channel in zip(member.positions.tolist(), member.channels.tolist()):
            if not 0 <= channel < size:
                continue
            seen = first_at.setdefault((*key, position), channel)
            a, b = find(seen), find(channel)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(c) for c in range(size)]


def listing_shape(members: Sequence[Any], size: int) -> tuple[bool, bool]:
    """``(ties, complete)``: whether some position of some member carries two different channels, and whether
    every member lists every channel of the group. Vectorized: the union-find of :func:`tied_classes` and the
    narrow-member search run only for groups that are not ``(False, True)``, the ordinary case."""
    by_key: dict[tuple[int, str], list[Any]] = {}
    for member in members:
        by_key.setdefault(_key(member), []).append(member)
    complete = True
    identity = torch.arange(size)
    for same in by_key.values():
        if len(same) == 1 and torch.equal(same[0].positions, identity) and torch.equal(same[0].channels, identity):
            continue  # the ordinary member: position c carries channel c, for every c
        if any(m.positions.numel() != m.channels.numel() for m in same):
            return True, False  # the union-find pairs them as zip() does
        positions = torch.cat([m.positions.reshape(-1).long() for m in same])
        channels = torch.cat([m.channels.reshape(-1).long() for m in same])
        keep = (channels >= 0) & (channels < size)
        positions, channels = positions[keep], channels[keep]
        complete = complete and torch.unique(channels).numel() == size
        distinct = torch.unique(positions).numel()
        if distinct != positions.numel() and torch.unique(positions * (size + 1) + channels).numel() != distinct:
            return True, complete
    return False, complete


def removed_positions(members: Sequence[Any], removed: Iterable[int]) -> dict[tuple[int, str], set[int]]:
    """Per module and axis, the positions a removal of ``removed`` (closed under ties) takes away."""
    chosen = set(int(c) for c in removed)
    result: dict[tuple[int, str], set[int]] = {}
    for member in members:
        lost = {p for p, c in zip(member.positions.tolist(), member.channels.tolist()) if c in chosen}
        if lost:
            result.setdefault(_key(member), set()).update(lost)
    return result


def member_shortfalls(members: Sequence[Any], removed: Iterable[int]) -> list[str]:
    """Descriptions of the members that removing ``removed`` would leave below :func:`member_minimum`."""
    lost = removed_positions(members, removed)
    problems, seen = [], set()
    for member in members:
        key = _key(member)
        width = member_width(member)
        if key in seen or key not in lost or width is None:
            continue
        seen.add(key)
        left, minimum = width - len(lost[key]), member_minimum(member)
        if left < minimum:
            problems.append(f"{member.module_name} ({member.kind}put channels: {width} -> {left}, at least "
                            f"{minimum} must remain)")
    return problems


def mapping_problem(members: Sequence[Any], root_width: int, size: int, ops: Sequence[str]) -> str | None:
    """Why the group's channel mapping cannot be right, or None. ``ops``: the split/concat/slice ops it crosses."""
    through = f" (through {', '.join(ops[:4])})" if ops else ""
    if size != root_width:
        return (f"Torch-Pruning numbers {size} channels for a root with {root_width}{through}; its split/concat index "
                "mapping is inconsistent here")
    covered: dict[tuple[int, str], list[torch.Tensor]] = {}
    for member in members:
        channels, positions = member.channels, member.positions
        if channels.numel() and not 0 <= int(channels.min()) <= int(channels.max()) < size:
            return (f"module {member.module_name!r} ({type(member.module).__name__}): Torch-Pruning numbers its "
                    f"channels up to {int(channels.max())} in a group of {size}{through}")
        width = member_width(member)
        if width is not None and positions.numel() and (int(positions.max()) >= width or int(positions.min()) < 0):
            return (f"module {member.module_name!r} ({type(member.module).__name__}, {member.kind}put channels): "
                    f"Torch-Pruning maps channel position {int(positions.max())} onto its {width} channels{through}")
        if member.kind == "out" and (member.is_conv or member.is_linear) and not member.is_depthwise:
            covered.setdefault(_key(member), []).append(positions.reshape(-1))
    for key, chunks in covered.items():
        member = next(m for m in members if _key(m) == key)
        width = member_width(member)
        count = torch.unique(torch.cat(chunks)).numel()
        if width is not None and count != width:
            return (f"module {member.module_name!r} ({type(member.module).__name__}): the group covers only "
                    f"{count} of its {width} output channels{through}, so the split/concat index mapping is "
                    "wrong for it")
    return None


def tied_through_reshape(members: Sequence[Any], size: int, ops: Sequence[str]) -> str | None:
    """Channels tied through a reshape/view: Torch-Pruning guesses an interleaved mapping there (skresnet's
    attention, viewed as ``[batch, paths, channels]``, becomes channel ``2k, 2k + 1`` per position ``k``), which
    keeps every shape valid while removing the wrong channels. Ties through a concat (ghost blocks) are real."""
    reshapes = [op for op in ops if op.startswith("_Reshape")]
    if not reshapes or tied_classes(members, size) == list(range(size)):
        return None
    return (f"channels are tied through {', '.join(reshapes[:3])}, where Torch-Pruning's channel mapping is a guess "
            "(a view that splits the channel axis)")


def shape_inconsistencies(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Modules whose channel attributes disagree with their weights after surgery (Torch-Pruning subtracts
    ``len(idxs)`` from ``out_channels`` even when ``idxs`` repeats a position)."""
    problems = []
    for name, m in modules:
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(m, _CONV):
            out_dim = 1 if m.transposed else 0
            expected_out = weight.shape[out_dim] * (m.groups if m.transposed else 1)
            expected_in = weight.shape[1 - out_dim] * (1 if m.transposed else m.groups)
            if (m.out_channels, m.in_channels) != (expected_out, expected_in) or 0 in weight.shape:
                problems.append(f"{name}: {type(m).__name__} says {m.in_channels}->{m.out_channels} channels, "
                                f"its weight is {tuple(weight.shape)}")
        elif isinstance(m, nn.Linear) and ((m.out_features, m.in_features) != tuple(weight.shape)
                                           or 0 in weight.shape):
            problems.append(f"{name}: Linear says {m.in_features}->{m.out_features}, its weight is "
                            f"{tuple(weight.shape)}")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and weight.dim() == 1 and m.num_features != weight.numel():
            problems.append(f"{name}: {type(m).__name__} says {m.num_features} features, its weight has "
                            f"{weight.numel()}")
    return problems


def ops_crossed(tp_group: Any) -> list[str]:
    """Names of the split/concat/slice/reshape ops a Torch-Pruning group passes through (for messages)."""
    names = []
    for item in tp_group:
        module = item.dep.target.module
        if type(module).__name__ in _OPS_OF_INTEREST and str(module) not in names:
            names.append(str(module))
    return names


class RemovalRules:
    """What a group's removals must respect beyond its own width: tied channels and narrow members.

    ``plain`` is True for the ordinary group (no tied channels, and every member that the group could narrow
    reads or writes every channel), where any removal leaving ``min_size`` channels is admissible, as before.
    Otherwise, and when ``probe`` is given, each channel's real effect is asked of the engine: ``probe(channels)``
    returns the members (module, axis, positions) that removing ``channels`` takes away, as surgery would. One
    probe per set of tied channels; the group's own listing cannot be trusted there (Torch-Pruning records one
    channel per position, so the 16 -> 8 ties of a ghost block do not show in it)."""

    def __init__(self, members: Sequence[Any], size: int, min_size: int,
                 probe: Callable[[list[int]], Sequence[Any]] | None = None, root: Any = None):
        self.members, self.size, self.min_size = members, size, min_size
        ties, complete = listing_shape(members, size)
        self.classes = tied_classes(members, size) if ties else list(range(size))
        self.at_risk = [] if complete and not ties else self._members_at_risk()  # every member has every channel
        self.plain = self.classes == list(range(size)) and not self.at_risk
        # class root -> {member key: positions it removes}; filled by probing, or from the listing
        self._lost: dict[int, dict[tuple[int, str], set[int]]] = {}
        self._widths: dict[tuple[int, str], tuple[str, int, int]] = {}
        if not self.plain and probe is not None and root is not None and self._hidden_ties(probe):
            self._probe_all(probe, root)
        self._tied: dict[int, list[int]] = {}
        if not self.plain:  # a plain group ties every channel to itself alone (closure() needs no table)
            for channel, first in enumerate(self.classes):
                self._tied.setdefault(first, []).append(channel)

    def _hidden_ties(self, probe: Callable[[list[int]], Sequence[Any]]) -> bool:
        """Whether removing the channels a narrow member does *not* list still cuts it (one probe per member):
        then its positions are tied to more channels than the listing shows and every channel is probed.
        Otherwise (mixnet's chunks read by separate depthwise convs) the listing is right."""
        by_key: dict[tuple[int, str], set[int]] = {}
        for member in self.at_risk:
            by_key.setdefault(_key(member), set()).update(member.channels.tolist())
        for key, listed in by_key.items():
            others = [c for c in range(self.size) if c not in listed]
            if others and any(_key(m) == key and m.positions.numel() for m in probe(others)):
                return True
        return False

    def _probe_all(self, probe: Callable[[list[int]], Sequence[Any]], root: Any) -> None:
        classes = [-1] * self.size
        for channel in range(self.size):
            if classes[channel] >= 0:
                continue
            lost: dict[tuple[int, str], set[int]] = {}
            for member in probe([channel]):
                lost.setdefault(_key(member), set()).update(member.positions.tolist())
                width = member_width(member)
                if width is not None:
                    self._widths[_key(member)] = (member.module_name, width, member_minimum(member))
            tied = sorted(p for p in lost.get((id(root), "out"), {channel}) if 0 <= p < self.size) or [channel]
            for c in tied + [channel]:
                classes[c] = channel
            self._lost[channel] = lost
        self.classes = classes
        self.at_risk = [m for m in self.members if _key(m) in self._widths]

    def _members_at_risk(self) -> list[Any]:
        """Members that removing channels could cut below their minimum (other than through the group's own
        ``min_size``): those with too few positions outside the group that do not carry every channel of it."""
        by_key: dict[tuple[int, str], list[Any]] = {}
        for member in self.members:
            by_key.setdefault(_key(member), []).append(member)
        risky = []
        ties = self.classes != list(range(self.size))
        for same in by_key.values():
            width = member_width(same[0])
            if width is None:
                continue
            positions = set().union(*(set(m.positions.tolist()) for m in same))
            channels = set().union(*(set(m.channels.tolist()) for m in same))
            # with tied channels one removal may take several of its positions at once
            if width - len(positions) < member_minimum(same[0]) and (len(channels) < self.size or ties):
                risky.extend(same)
        return risky

    def closure(self, indices: Iterable[int]) -> list[int]:
        """``indices`` with every channel tied to them: what surgery really removes."""
        if self.plain:
            return sorted({int(i) for i in indices})
        return sorted({c for i in indices for c in self._tied[self.classes[int(i)]]})

    def shortfalls(self, removed: Iterable[int]) -> list[str]:
        """Descriptions of the members that removing ``removed`` (closed under ties) would leave too narrow."""
        if not self._lost:
            return member_shortfalls(self.at_risk, removed) if self.at_risk else []
        lost: dict[tuple[int, str], set[int]] = {}
        for first in {self.classes[int(c)] for c in removed}:
            for key, positions in self._lost.get(first, {}).items():
                lost.setdefault(key, set()).update(positions)
        problems = []
        for key, positions in lost.items():
            if key in self._widths:
                name, width, minimum = self._widths[key]
                if width - len(positions) < minimum:
                    problems.append(f"{name} ({key[1]}put channels: {width} -> {width - len(positions)}, at least "
                                    f"{minimum} must remain)")
        return problems

    def greedy(self, units: Iterable[Sequence[int]], n_remove: int) -> list[int]:
        """Take ``units`` (lists of channels, lowest-scored first), each with its tied channels, while the total
        stays within ``n_remove``, ``min_size`` channels remain and no member falls below its minimum."""
        chosen: set[int] = set()
        for unit in units:
            if len(chosen) >= n_remove:
                break
            extra = set(self.closure(unit)) - chosen
            if not extra or len(chosen) + len(extra) > n_remove or self.size - len(chosen) - len(extra) < self.min_size:
                continue
            if self.at_risk and self.shortfalls(chosen | extra):
                continue
            chosen |= extra
        return sorted(chosen)
