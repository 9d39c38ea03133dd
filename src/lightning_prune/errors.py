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


class InconsistentRanksError(PruningError):
    """Distributed processes decided different pruning; nothing was pruned."""


class PlanMismatchError(PruningError):
    """A pruning plan does not fit the model it is applied to."""


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
        raise ValueError(f"{param} must be a number in {low}, got {value!r}.")
    value = float(value)
    if not (0.0 <= value < 1.0) or (not allow_zero and value == 0.0):
        raise ValueError(f"{param} must be in {low}, got {value!r}.")
    return value


def check_positive_int(param: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{param} must be an integer >= {minimum}, got {value!r}.")
    return value
