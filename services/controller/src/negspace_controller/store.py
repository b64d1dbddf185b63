"""Qdrant, the system of record: one collection per run; ids, unit vectors and payloads.

Every point's payload holds ``text``, ``_seq`` (the controller's insertion sequence, which
fixes the in-memory row order and tie-breaks across restarts) and the caller's keys (run,
node, round, ...). Three engines behind one interface (``Store``), each its own class:
``store_qdrant.ServerStore`` (a Qdrant server), ``store_qdrant.LocalStore`` (qdrant-client's local
mode) and ``store_edge.EdgeStore`` (Qdrant's Rust engine in-process, the embedded default);
``stores.open_store`` is the one place the settings choose one, importing only its module.

This module is what they share: the protocol, the point keys, the "is it down?" bookkeeping
(``FaultState``; each engine maps its own faults in one ``_fault``), and what a folder holds.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
from negspace_contracts.errors import ServiceUnavailableError

log = logging.getLogger("negspace.controller")

SEQ_KEY = "_seq"
TEXT_KEY = "text"
RESERVED_KEYS = frozenset({SEQ_KEY, TEXT_KEY})
RETRY_AFTER_S = 5
PROBE_TIMEOUT_S = 3.0  # /health and the "is it back?" check before each call while Qdrant is down


def to_key(point_id: Any) -> Hashable:
    """Canonical in-memory key: int, or uuid.UUID (Qdrant returns UUIDs as strings)."""
    if isinstance(point_id, bool):
        raise TypeError("bool is not a point id")
    if isinstance(point_id, int):
        return point_id
    if isinstance(point_id, uuid.UUID):
        return point_id
    return uuid.UUID(str(point_id))


def to_qdrant_id(key: Hashable) -> int | str:
    return key if isinstance(key, int) else str(key)


class Store(Protocol):
    """What the controller uses of a store: ``store_qdrant.ServerStore``, ``store_qdrant.LocalStore``
    and ``store_edge.EdgeStore`` provide exactly this. Faults come out as negspace
    errors: ``ServiceUnavailableError`` (503, the engine or its disk failed), ``NotFoundError``
    (no such collection), ``ConflictError``."""

    engine: str  # "server", "local" (qdrant-client local mode) or "edge"
    remote: bool
    where: str
    prefix: str
    down: str | None
    down_since: float | None

    def describe(self) -> str: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    def qname(self, name: str) -> str: ...
    def names(self) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def dimension(self, name: str) -> tuple[int, str | None]: ...
    def create(self, name: str, dimension: int, embedder: str, owner: str | None = None) -> None: ...
    def owner(self, name: str) -> str | None: ...
    def drop(self, name: str) -> None: ...
    def count(self, name: str) -> int: ...
    def upsert(self, name: str, keys: list[Hashable], vectors: np.ndarray, payloads: list[dict]) -> None: ...
    def delete_points(self, name: str, keys: list[Hashable]) -> None: ...
    def retrieve(self, name: str, keys: list[Hashable]) -> dict[Hashable, tuple[np.ndarray, dict]]: ...
    def scan(self, name: str, *, with_vectors: bool = True, where: Mapping[str, Any] | None = None,
             batch: int = 2048) -> Iterator[tuple[Hashable, np.ndarray | None, dict]]: ...


class FaultState:
    """The "is it down?" bookkeeping every engine shares: a call that fails with a 503 marks the
    store down (logged once, with the time), the next call that succeeds marks it up again."""

    down: str | None = None  # why the last call failed; None once one succeeds
    down_since: float | None = None

    def describe(self) -> str:  # pragma: no cover - every store names itself
        raise NotImplementedError

    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        raise NotImplementedError  # pragma: no cover

    def _raise_fault(self, exc: Exception, what: str, timeout: float | None = None) -> NoReturn:
        """Re-raise a failed call as ours (a 503 also marks the store down), or as it is."""
        err = self._fault(exc, what, timeout=timeout)
        if err is None:
            raise exc
        if isinstance(err, ServiceUnavailableError):
            self._mark_down(err.message)
        raise err from exc

    def _mark_down(self, why: str) -> None:
        if self.down is None:
            log.warning("%s", why)
            self.down_since = time.monotonic()
        self.down = why

    def _mark_up(self) -> None:
        if self.down is not None:
            log.info("%s answers again (it failed for %.0f s)", self.describe(),
                     time.monotonic() - (self.down_since or time.monotonic()))
        self.down = None
        self.down_since = None


# ------------------------------------------------------------------ what a folder holds
EDGE_META_FILE = "collection.json"  # an edge collection exists exactly when its folder holds this


def is_local_mode_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a qdrant-client local-mode store (its ``meta.json`` lists the
    collections; an edge folder never has one: collection names cannot contain '.')."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return "collections" in json.loads(meta.read_text())
    except (OSError, ValueError):
        return True  # a meta.json we cannot read is not ours either: do not write beside it


def is_edge_folder(path: str | Path) -> bool:
    """Whether ``path`` holds edge collections (an empty edge folder holds nothing to hide)."""
    return any(Path(path).glob(f"*/{EDGE_META_FILE}"))
