"""The pruning plan: plain, JSON-serializable record of what was removed.

For every channel group the plan keeps the group's original width and the original indices of the channels
still alive. Successive prune events compose into it, so applying a plan is a single removal on a freshly built
model, whatever the number of events that produced it. Checkpoints store ``plan.to_dict()``: only str, int and
lists, so they load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

PLAN_FORMAT_VERSION = 1


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
            raise ValueError(
                f"plan: group {name!r} has {current_size} channels in the model but the plan says {record.width}; "
                "the plan does not belong to this model state."
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
            "version": PLAN_FORMAT_VERSION,
            "groups": {
                name: {"original_size": r.original_size, "kept": list(r.kept)} for name, r in self.groups.items()
            },
            "events": [dict(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | "PruningPlan" | None) -> "PruningPlan":
        if data is None:
            return cls()
        if isinstance(data, PruningPlan):
            return cls.from_dict(data.to_dict())
        version = data.get("version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan: format version {version} is not supported (expected {PLAN_FORMAT_VERSION}).")
        groups = {
            name: GroupRecord(int(entry["original_size"]), [int(i) for i in entry["kept"]])
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
