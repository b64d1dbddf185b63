"""``SharedState``: what the scheduler, the rounds and the training hand-off are each built from."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from negspace_orchestrator.dependencies import Dependencies
    from negspace_orchestrator.events import EventLog
    from negspace_orchestrator.settings import OrchestratorSettings
    from negspace_orchestrator.store import Store


class SharedState:
    """The base of the rooms that act on runs: the settings, the store, the dependencies and the
    event log, one of each per orchestrator, shared by all of them."""

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies, events: EventLog) -> None:
        self.settings = settings
        self.store = store
        self.deps = deps
        self.events = events
