"""The orchestrator's own two failures of a run's work (the wire errors are in ``negspace_contracts``):
one that waiting fixes (the run pauses) and one that it does not (the run fails)."""

from __future__ import annotations


class DependencyDown(Exception):
    """A dependency stayed down for the whole retry budget; the run is paused with this reason."""

    def __init__(self, service: str, reason: str, *, controller: str | None = None) -> None:
        super().__init__(f"{service} unavailable: {reason}")
        self.service = service
        self.reason = reason
        self.controller = controller  # the controller replica's URL, when that is what is down


class RunFailed(Exception):
    """A problem that waiting will not fix (the message says what to change)."""
