"""Run events: written with the run's other rows, and the wake-ups of whoever follows a run."""

from __future__ import annotations

import asyncio
from typing import Any

from negspace_contracts.orchestrator import RunEventData

from negspace_orchestrator.store import Store


class EventLog:
    """``emit`` stores an event and wakes the run's followers; ``waiter`` is what a follower awaits."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._changed: dict[str, asyncio.Event] = {}

    def emit(self, run_id: str, data: RunEventData) -> None:
        self.store.add_event(run_id, data)
        self.notify(run_id)

    def notify(self, run_id: str) -> None:
        ev = self._changed.pop(run_id, None)
        if ev is not None:
            ev.set()

    def waiter(self, run_id: str) -> asyncio.Event:
        return self._changed.setdefault(run_id, asyncio.Event())

    def set_status(self, run_id: str, status: str, **kw: Any) -> None:
        """The run's status (the store writes its ``status`` event in the same transaction)."""
        self.store.set_status(run_id, status, **kw)
        self.notify(run_id)
