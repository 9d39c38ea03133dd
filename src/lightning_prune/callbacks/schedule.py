"""When pruning happens and how far each event goes.

A schedule is a list of ``(epoch, cumulative_target)`` pairs: at the start of ``epoch`` the model is pruned until
``cumulative_target`` (a fraction of channels, or of FLOPs) of the original is removed.
"""
from __future__ import annotations

from typing import Sequence

SCHEDULES = ("one_shot", "iterative", "agp")


def cumulative_targets(final: float, steps: int, schedule: str) -> list[float]:
    """Targets after each of ``steps`` events.

    ``"one_shot"``: everything at once. ``"iterative"``: equal increments. ``"agp"``: Zhu & Gupta's automated
    gradual pruning, ``s_t = s_f (1 - (1 - t/n)^3)``: large steps first, while the network is most redundant.
    """
    if schedule == "one_shot":
        return [final]
    if schedule == "iterative":
        return [final * (t + 1) / steps for t in range(steps)]
    if schedule == "agp":
        return [final * (1.0 - (1.0 - (t + 1) / steps) ** 3) for t in range(steps)]
    raise ValueError(f"schedule={schedule!r} is not supported; accepted values: {', '.join(map(repr, SCHEDULES))}.")


def schedule_epochs(start_epoch: int, end_epoch: int | None, steps: int, schedule: str) -> list[int]:
    """Epochs of the events: ``start_epoch`` alone for one-shot, else ``steps`` epochs spread evenly over
    ``[start_epoch, end_epoch]`` (default: one per epoch from ``start_epoch``)."""
    if schedule == "one_shot":
        return [start_epoch]
    if end_epoch is None:
        end_epoch = start_epoch + steps - 1
    if steps == 1:
        return [start_epoch]
    span = end_epoch - start_epoch
    epochs = [start_epoch + round(span * t / (steps - 1)) for t in range(steps)]
    if len(set(epochs)) != len(epochs):
        raise ValueError(
            f"steps={steps} events do not fit between start_epoch={start_epoch} and end_epoch={end_epoch}: "
            "each event needs its own epoch."
        )
    return epochs


def build_schedule(
    final: float,
    *,
    schedule: str,
    epochs: Sequence[int] | None,
    start_epoch: int,
    end_epoch: int | None,
    steps: int,
) -> list[tuple[int, float]]:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; accepted values: {', '.join(map(repr, SCHEDULES))}.")
    if epochs is not None:
        epochs = [int(e) for e in epochs]
        if not epochs or sorted(set(epochs)) != epochs or epochs[0] < 0:
            raise ValueError(f"epochs must be a non-empty, strictly increasing list of epochs >= 0, got {epochs!r}.")
        kind = "iterative" if schedule == "one_shot" else schedule
        return list(zip(epochs, cumulative_targets(final, len(epochs), kind if len(epochs) > 1 else "one_shot")))
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}.")
    if end_epoch is not None and end_epoch < start_epoch:
        raise ValueError(f"end_epoch={end_epoch} must be >= start_epoch={start_epoch}.")
    steps = 1 if schedule == "one_shot" else steps
    return list(zip(schedule_epochs(start_epoch, end_epoch, steps, schedule), cumulative_targets(final, steps, schedule)))
