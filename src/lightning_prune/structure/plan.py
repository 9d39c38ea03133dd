"""The pruning plan: plain, JSON-serializable record of what was removed.

For every channel group the plan keeps the group's original width and the original indices of the channels
still alive. Successive prune events compose into it, so applying a plan is a single removal on a freshly built
model, whatever the number of events that produced it. Checkpoints store ``plan.to_dict()``: only str, int and
lists, so they load with ``torch.load(weights_only=True)``.

The serialized form (format 1)::

    {"format": 1,
     "groups": {"<group name>": {"original_size": <int >= 1>, "kept": [<int>, ...]}, ...},
     "events": [{...}, ...]}

``kept`` holds the original indices of the channels still alive: integers in ``[0, original_size)``, unique and
sorted, at least one. :meth:`PruningPlan.from_dict` checks all of it and raises
:class:`~lightning_prune.errors.InvalidPlanError` naming the group and the field; plans written before the
``format`` field existed (``"version": 1`` or no version at all) are read as format 1.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import InvalidPlanError, PlanMismatchError

PLAN_FORMAT_VERSION = 1
_TOP_LEVEL_KEYS = ("format", "version", "groups", "events")
_GROUP_FIELDS = ("original_size", "kept")


@dataclass
class GroupRecord:
    original_size: int
    kept: list[int]

    @property
    def width(self) -> int:
        return len(self.kept)


@dataclass
class PruningPlan:
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    # -- composition -----------------------------------------------------------------------------------------
    def track(self, name: str, current_size: int) -> GroupRecord:
        """The record of ``name``; a group seen for the first time starts fully kept."""
        record = self.groups.get(name)
        if record is None:
            record = self.groups[name] = GroupRecord(current_size, list(range(current_size)))
        elif record.width != current_size:
            raise PlanMismatchError(
                f"plan: group {name!r}, field 'kept': the model has {current_size} channels in this group but the "
                f"plan keeps {record.width}; the plan does not belong to this model state."
            )
        return record

    def record_removal(self, name: str, current_size: int, removed: Iterable[int]) -> None:
        record = self.track(name, current_size)
        removed_set = set(int(i) for i in removed)
        record.kept = [orig for local, orig in enumerate(record.kept) if local not in removed_set]

    def add_event(self, **info: Any) -> None:
        self.events.append(dict(info))

    # -- queries -----------------------------------------------------------------------------------------------
    def widths(self) -> dict[str, int]:
        return {name: record.width for name, record in self.groups.items()}

    def removed_channels(self) -> int:
        return sum(r.original_size - r.width for r in self.groups.values())

    def is_empty(self) -> bool:
        return all(r.width == r.original_size for r in self.groups.values())

    def checksum(self) -> str:
        """A digest of what was removed (not of the event log), to compare plans across processes."""
        canonical = json.dumps(
            {name: [r.original_size, r.kept] for name, r in sorted(self.groups.items())}, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- serialization -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT_VERSION,
            "groups": {
                name: {"original_size": r.original_size, "kept": list(r.kept)} for name, r in self.groups.items()
            },
            "events": [dict(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | "PruningPlan" | None) -> "PruningPlan":
        """Read a plan, checking it entirely (see the module docstring for the schema); nothing is coerced:
        floats, bools, out-of-range, duplicate or unsorted indices are errors, not silently fixed."""
        if data is None:
            return cls()
        if isinstance(data, PruningPlan):
            return cls.from_dict(data.to_dict())
        validate_plan_dict(data)
        groups = {
            name: GroupRecord(entry["original_size"], list(entry["kept"]))
            for name, entry in data.get("groups", {}).items()
        }
        return cls(groups=groups, events=[dict(e) for e in data.get("events", [])])

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        return cls.from_dict(json.loads(text))

    def copy(self) -> "PruningPlan":
        return PruningPlan.from_dict(self.to_dict())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_plan_dict(data: Any) -> None:
    """Raise :class:`InvalidPlanError` naming the group and the field of every problem found in ``data``."""
    if not isinstance(data, dict):
        raise InvalidPlanError(f"plan must be a dict (PruningPlan.to_dict()) or a PruningPlan, got "
                               f"{type(data).__name__}.")
    problems: list[str] = []
    unknown = [k for k in data if k not in _TOP_LEVEL_KEYS]
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: "
                        f"{', '.join(map(repr, _TOP_LEVEL_KEYS))}")
    for key in ("format", "version"):
        if key in data and (not _is_int(data[key]) or data[key] != PLAN_FORMAT_VERSION):
            problems.append(f"field {key!r}: format {data[key]!r} is not supported (expected {PLAN_FORMAT_VERSION})")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        problems.append(f"field 'groups' must be a dict of group name -> {{'original_size', 'kept'}}, got "
                        f"{type(groups).__name__}")
        groups = {}
    for name, entry in groups.items():
        where = f"group {name!r}"
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: group names must be non-empty strings")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a dict with fields 'original_size' and 'kept', got "
                            f"{type(entry).__name__}")
            continue
        missing = [f for f in _GROUP_FIELDS if f not in entry]
        extra = [f for f in entry if f not in _GROUP_FIELDS]
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"{where}: unknown field(s) {', '.join(map(repr, extra))}; accepted: 'original_size', "
                            "'kept'")
        size = entry.get("original_size")
        if "original_size" in entry and (not _is_int(size) or size < 1):
            problems.append(f"{where}, field 'original_size': must be an integer >= 1, got {size!r}")
            size = None
        if "kept" not in entry:
            continue
        kept = entry["kept"]
        if not isinstance(kept, (list, tuple)):
            problems.append(f"{where}, field 'kept': must be a list of channel indices, got {type(kept).__name__}")
            continue
        not_int = [i for i in kept if not _is_int(i)]
        if not_int:
            problems.append(f"{where}, field 'kept': entries must be integers, got {not_int[:5]!r}")
            continue
        if not kept:
            problems.append(f"{where}, field 'kept': is empty; a group keeps at least one channel")
        if _is_int(size):
            out = [i for i in kept if not 0 <= i < size]
            if out:
                problems.append(f"{where}, field 'kept': indices {out[:5]} are out of range [0, {size}) "
                                "(original_size)")
            if len(kept) > size:
                problems.append(f"{where}, field 'kept': keeps {len(kept)} channels, more than original_size={size}")
        if len(set(kept)) != len(kept):
            problems.append(f"{where}, field 'kept': contains duplicate indices")
        elif list(kept) != sorted(kept):
            problems.append(f"{where}, field 'kept': indices must be sorted in increasing order")
    events = data.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        problems.append("field 'events' must be a list of dicts")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InvalidPlanError(f"plan is invalid: {shown}.")
