"""Exceptions and argument checks shared by every layer.

Every check names the parameter and the accepted values, so a bad configuration fails before training starts.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class LightningPruneError(Exception):
    """Base class of every error raised by lightning-prune."""


class UnsupportedModelError(LightningPruneError, RuntimeError):
    """The model cannot be traced or pruned; the message names the module or operation responsible."""


class GraphBuildTimeout(UnsupportedModelError):
    """Building the dependency graph exceeded its time or memory bound."""


class PruningError(LightningPruneError, RuntimeError):
    """A pruning step failed. The model has been restored to its state before the step."""


class EventTimeoutError(LightningPruneError, TimeoutError):
    """A pruning event (graph build, exclusion probing, surgery) ran past ``event_timeout``; the model is restored
    to its state before the event. Not a :class:`PruningError`: no group is to blame, so none is excluded."""


class InconsistentRanksError(PruningError):
    """Distributed processes decided different pruning; nothing was pruned."""


class PlanMismatchError(PruningError):
    """A pruning plan does not fit the model it is applied to."""


class ArgumentTypeError(LightningPruneError, TypeError, ValueError):
    """An argument has the wrong type. A ``TypeError``, and a ``ValueError`` too, so that code written against the
    older checks (which raised ``ValueError``) keeps working."""


class InvalidPlanError(LightningPruneError, ValueError):
    """A pruning plan is malformed (schema, types, indices); the message names the group and the field."""


class NonFiniteScoresError(PruningError):
    """A criterion produced NaN or infinite scores (the network or the scoring data is not finite)."""


class CheckpointError(LightningPruneError, ValueError):
    """A checkpoint file cannot be read, or does not hold what was expected; the message names the path."""


def check_choice(param: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=3)
            if close:
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?"
        raise ValueError(
            f"{param}={value!r} is not supported; accepted values: {', '.join(repr(c) for c in choices)}.{hint}"
        )
    return value


def check_fraction(param: str, value: Any, *, allow_zero: bool = True) -> float:
    """Accept a float in [0, 1) (or (0, 1) when ``allow_zero`` is False)."""
    low = "[0, 1)" if allow_zero else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{param} must be a number in {low}, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not (0.0 <= value < 1.0) or (not allow_zero and value == 0.0):
        raise ValueError(f"{param} must be in {low}, got {value!r}.")
    return value


def check_positive_int(param: str, value: Any, *, minimum: int = 1) -> int:
    return check_int(param, value, minimum=minimum)


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(param: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An ``int`` (``bool`` and floats such as ``3.0`` are rejected: silently truncating them hides mistakes)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        bound = f" >= {minimum}" if minimum is not None else ""
        none = " or None" if allow_none else ""
        raise ArgumentTypeError(f"{param} must be an integer{bound}{none}, got {value!r} ({_type_name(value)}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{param} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_number(param: str, value: Any, *, minimum: float | None = None, allow_none: bool = False,
                 exclusive_minimum: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{param} must be a number{' or None' if allow_none else ''}, got {value!r} "
                        f"({_type_name(value)}).")
    if value != value:  # NaN
        raise ValueError(f"{param} must be a number, got NaN.")
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        raise ValueError(f"{param} must be {'>' if exclusive_minimum else '>='} {minimum}, got {value!r}.")
    return value


def check_bool(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{param} must be True or False, got {value!r} ({_type_name(value)}).")
    return value


def check_callable(param: str, value: Any, *, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ArgumentTypeError(f"{param} must be a callable{' or None' if allow_none else ''}, got {value!r} "
                        f"({_type_name(value)}).")
    return value


def check_mapping(param: str, value: Any, *, allow_none: bool = True, keys: Iterable[str] | None = None) -> dict:
    """A dict (``None`` gives ``{}``) whose keys are strings, and, when ``keys`` is given, among ``keys``."""
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise ArgumentTypeError(f"{param} must be a dict{' or None' if allow_none else ''}, got {value!r} "
                        f"({_type_name(value)}).")
    for key in value:
        if not isinstance(key, str):
            raise ArgumentTypeError(f"{param}: keys must be strings, got {key!r}.")
    if keys is not None:
        keys = list(keys)
        unknown = [k for k in value if k not in keys]
        if unknown:
            hint = ""
            close = difflib.get_close_matches(unknown[0], keys, n=3)
            if close:
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?"
            raise ValueError(f"{param}: unknown key(s) {', '.join(map(repr, unknown))}; accepted keys: "
                             f"{', '.join(map(repr, keys))}.{hint}")
    return dict(value)


def check_int_list(param: str, value: Any, *, minimum: int | None = None) -> list[int]:
    """A list or tuple of ``int`` (no floats, no bools, not a string)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(f"{param} must be a list of integers, got {value!r} ({_type_name(value)}).")
    for item in value:
        check_int(f"{param} entries", item, minimum=minimum)
    return list(value)


def check_names(param: str, value: Any) -> list[str]:
    """A name or a list of names (strings)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ArgumentTypeError(f"{param} must be a module name or a list of module names, got {value!r} "
                        f"({_type_name(value)}).")
    for item in value:
        if not isinstance(item, str):
            raise ArgumentTypeError(f"{param} entries must be module names (str), got {item!r} ({_type_name(item)}).")
    return list(value)
