"""Reading checkpoint files with errors that say which file and what was expected.

``torch.load`` on a bad file fails with whatever its reader hit first (``EOFError``, ``OSError: [Errno 22]``,
``UnpicklingError``, ``KeyError: 101``), none naming the file. :func:`read_checkpoint` turns every such failure
into a :class:`~lightning_prune.errors.CheckpointError` naming the path, what is wrong and what a checkpoint
written by ``Trainer.save_checkpoint`` looks like; :func:`guard_resume` does the same for ``Trainer.fit(ckpt_path=)``.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

import torch

from ..errors import CheckpointError

EXPECTED = ("a Lightning checkpoint written by Trainer.save_checkpoint or ModelCheckpoint (a torch.save'd dict "
            "with a 'state_dict' entry)")


def _describe_file(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint, from cheap checks on the file itself; None if it may be one."""
    if not os.path.exists(path):
        return "the file does not exist"
    if os.path.isdir(path):
        return "it is a directory"
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):  # torch.save's zip format: a truncated file has no central directory
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            return f"the file is truncated or corrupt ({size} bytes; zip archive unreadable: {error})"
        return None
    if head[:1] == b"\x80":  # a legacy (pre-1.6) pickle-based torch.save file
        return None
    return f"the file is not a torch.save archive ({size} bytes, starting with {head!r})"


def check_checkpoint_dict(label: str, checkpoint: Any) -> dict:
    """``checkpoint`` if it is a Lightning checkpoint dict; else :class:`CheckpointError` starting with ``label``."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{label}: holds a {type(checkpoint).__name__}, expected {EXPECTED}.")
    if "state_dict" not in checkpoint:
        hint = ""
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            hint = (" It looks like a plain model state dict (model.state_dict()); load it with "
                    "module.load_state_dict(torch.load(path)) on a module rebuilt with apply_plan.")
        raise CheckpointError(f"{label}: has no 'state_dict' entry (keys: {sorted(map(str, checkpoint))[:6]}); "
                              f"expected {EXPECTED}.{hint}")
    return checkpoint


def read_checkpoint(path: Any, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint, or :class:`CheckpointError` naming
    ``path`` when it is missing, empty, truncated, not a torch file, or not a Lightning checkpoint."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint_path must be a path (str or os.PathLike), got {path!r} "
                              f"({type(path).__name__}).")
    path = os.fspath(path)
    problem = _describe_file(path)
    if problem is not None:
        error_type = FileNotFoundError if problem == "the file does not exist" else CheckpointError
        raise error_type(f"checkpoint {path}: cannot be read: {problem}; expected {EXPECTED}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(error).__name__}: {error}); expected "
                              f"{EXPECTED}.") from error
    return check_checkpoint_dict(f"checkpoint {path}", checkpoint)


def guard_resume(strategy: Any) -> Callable[[], None]:
    """Make ``strategy.load_checkpoint`` (what ``Trainer.fit(ckpt_path=...)`` calls) fail with a
    :class:`CheckpointError` naming the file when the file is unreadable. Returns the function that removes the
    guard (the callback calls it in ``teardown`` and ``on_exception``)."""
    original = strategy.load_checkpoint
    # Only an instance attribute is set, so removing it brings back the class's method.
    had_own = "load_checkpoint" in vars(strategy)

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.fspath(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else None
        if path is not None and "://" not in path:
            problem = _describe_file(path)
            if problem is not None and problem != "the file does not exist":
                raise CheckpointError(f"ckpt_path {path}: cannot resume: {problem}; expected {EXPECTED}.")
        try:
            checkpoint = original(checkpoint_path, *args, **kwargs)
        except (FileNotFoundError, CheckpointError):
            raise
        except Exception as error:
            raise CheckpointError(f"ckpt_path {checkpoint_path}: cannot resume ({type(error).__name__}: {error}); "
                                  f"expected {EXPECTED}.") from error
        return check_checkpoint_dict(f"ckpt_path {checkpoint_path}", checkpoint) if path is not None else checkpoint

    strategy.load_checkpoint = load_checkpoint

    def remove() -> None:
        if vars(strategy).get("load_checkpoint") is load_checkpoint:
            if had_own:
                strategy.load_checkpoint = original
            else:
                del strategy.load_checkpoint

    return remove
