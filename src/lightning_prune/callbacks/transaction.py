"""A prune event inside a Trainer as one transaction: all of it happens, or none of it.

An event changes the module (surgery), every optimizer of the trainer (transplant), the callback's state (plan,
reports) and, under DDP, the wrapper. :class:`EventTransaction` takes references to all of them before the event
(no tensor is copied) and :meth:`~EventTransaction.rollback` puts them back when the event fails or is
interrupted, so neither training nor a checkpoint written afterwards (``OnExceptionCheckpoint`` runs in
``on_exception``, after the rollback) ever sees a half-pruned model.
"""
from __future__ import annotations

import copy
from typing import Any

from ..structure import ModelSnapshot, OptimizerSnapshot
from . import distributed, interop


class EventTransaction:
    def __init__(self, trainer: Any, pl_module: Any, callback: Any):
        self.trainer, self.pl_module, self.callback = trainer, pl_module, callback
        self.model = ModelSnapshot(pl_module)
        self.optimizers = [OptimizerSnapshot(optimizer) for optimizer in trainer.optimizers]
        # Weight averaging's model copies get the same surgery during the event (interop.CopySurgery).
        self.copies = [ModelSnapshot(model) for _, model in interop.averaged_copies(trainer)]
        self.state = copy.deepcopy(callback.state_dict())  # plain data (lists, dicts, ints)

    def rollback(self) -> None:
        """Restore the module, the optimizers and the callback's state as they were before the event. Groups
        found unprunable during the failed event stay remembered (that knowledge is still true)."""
        self.model.restore()
        for optimizer in self.optimizers:
            optimizer.restore()
        for copy_snapshot in self.copies:
            copy_snapshot.restore()
        excluded = dict(getattr(self.callback, "excluded_groups", {}))
        self.callback.load_state_dict(copy.deepcopy(self.state))
        self.callback.excluded_groups.update(excluded)
        distributed.rewrap(self.trainer, self.pl_module)
