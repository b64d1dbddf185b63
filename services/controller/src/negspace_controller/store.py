"""Qdrant, the system of record: one collection per run; ids, unit vectors and payloads.

Every point's payload holds ``text``, ``_seq`` (the controller's insertion sequence, which
fixes the in-memory row order and tie-breaks across restarts) and the caller's keys (run,
node, round, ...). Three engines behind one interface (``Store``): ``QdrantStore`` here, against
a Qdrant server (``url``) or qdrant-client's local mode (a folder or ``:memory:``), and
``store_edge.EdgeStore``, Qdrant's Rust engine in-process (the embedded default). Local mode is
not thread-safe, so there every call holds one lock; the server client (httpx) is, so server
calls run concurrently.

Faults are mapped to negspace errors in ONE place (``QdrantStore._call``): a Qdrant that is
unreachable, slow beyond ``timeout`` seconds, answering 5xx/429/401/403 or garbage becomes a
``ServiceUnavailableError`` (HTTP 503, retryable) naming Qdrant and its URL; a 404 becomes
``NotFoundError``. While Qdrant is known to be down, every call first asks it a cheap question
with a short timeout, so queued requests fail in seconds instead of each waiting ``timeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

import httpx
import numpy as np
from negspace_contracts.errors import ConflictError, NotFoundError, ServiceUnavailableError
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

log = logging.getLogger("negspace.controller")
T = TypeVar("T")

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


def _cause(exc: BaseException) -> BaseException:
    """The transport error under qdrant-client's ResponseHandlingException, if any."""
    inner = getattr(exc, "source", None)
    return inner if isinstance(inner, BaseException) else exc


def _body(exc: UnexpectedResponse) -> str:
    try:
        text = exc.content.decode("utf-8", "replace").strip()
    except Exception:  # pragma: no cover - content is bytes
        text = ""
    return (text[:200] + "...") if len(text) > 200 else text


class Store(Protocol):
    """What the controller uses of a store (service.py, comparison.py, app.py, bench.py): both
    ``QdrantStore`` and ``store_edge.EdgeStore`` provide exactly this. Faults come out as negspace
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
    """The "is it down?" bookkeeping both stores share: a call that fails with a 503 marks the
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


class QdrantStore(FaultState):
    def __init__(self, *, url: str | None = None, path: str | None = None, api_key: str | None = None,
                 prefix: str = "negspace_", timeout: float = 30.0,
                 probe_timeout: float = PROBE_TIMEOUT_S,
                 collection_params: Mapping[str, int] | None = None) -> None:
        self.remote = bool(url)
        if collection_params and not url:
            raise ValueError(f"{', '.join(collection_params)} configure a Qdrant server's collections; "
                             "local mode keeps one shard and one copy in this process")
        # shard_number / replication_factor / write_consistency_factor of every new collection
        self.collection_params = dict(collection_params or {})
        self.engine = "server" if url else "local"
        self.timeout = float(timeout)
        self._probe: QdrantClient | None = None
        if url:
            # qdrant-client rounds timeouts up to whole seconds; without one, httpx's 5 s default applies
            self.client = QdrantClient(url=url, api_key=api_key, timeout=math.ceil(timeout))
            self._probe_timeout = math.ceil(min(probe_timeout, timeout))
            self._probe = QdrantClient(url=url, api_key=api_key, check_compatibility=False,
                                       timeout=self._probe_timeout)
            self.where = url
            self._lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            if path == ":memory:":
                self.client = QdrantClient(location=":memory:")
                self.where = ":memory:"
            else:
                self.client = QdrantClient(path=path)
                self.where = path or ""
            self._lock = threading.RLock()
        self.prefix = prefix
        self.down: str | None = None  # why the last call failed (server mode); None once one succeeds
        self.down_since: float | None = None

    # ------------------------------------------------------------------ the one fault mapping
    def describe(self) -> str:
        return f"Qdrant at {self.where}" if self.remote else f"local Qdrant storage {self.where}"

    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        """The negspace error for a failed Qdrant call, or None when ``exc`` is not a Qdrant fault."""
        where = self.describe()
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        hint = "; retry when it is healthy again (GET /health says)"
        if isinstance(exc, UnexpectedResponse):
            status = exc.status_code
            if status == 404:
                return NotFoundError(f"{where} does not know what {what} needed: {_body(exc)}")
            if status == 409:
                return ConflictError(f"{where} refused {what}: {_body(exc)}")
            if status in (401, 403):
                return ServiceUnavailableError(f"{where} refused {what} with {status}: check "
                                               f"--qdrant-api-key{hint}", headers=retry)
            return ServiceUnavailableError(f"{where} answered {status} to {what}: {_body(exc)}{hint}",
                                           headers=retry)
        if isinstance(exc, ResourceExhaustedResponse):
            return ServiceUnavailableError(f"{where} is overloaded ({exc.message}) during {what}{hint}",
                                           headers={"Retry-After": str(max(1, exc.retry_after_s))})
        if isinstance(exc, (ResponseHandlingException, httpx.HTTPError)):
            cause = _cause(exc)
            if isinstance(cause, httpx.TimeoutException):
                why = (f"did not answer {what} within {timeout or self.timeout:g} s"
                       f"{'' if timeout else ' (--qdrant-timeout-s)'}")
            elif isinstance(cause, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                                    httpx.WriteError)):
                why = f"is unreachable ({type(cause).__name__}: {cause or 'connection failed'}) during {what}"
            elif isinstance(cause, httpx.HTTPError):
                why = f"failed during {what} ({type(cause).__name__}: {cause})"
            else:
                why = f"answered {what} with something that is not Qdrant's API ({type(cause).__name__})"
            return ServiceUnavailableError(f"{where} {why}{hint}", headers=retry)
        if self.remote and isinstance(exc, json.JSONDecodeError):  # qdrant-client does not wrap these
            return ServiceUnavailableError(f"{where} answered {what} with something that is not Qdrant's "
                                           f"API (not JSON){hint}", headers=retry)
        if not self.remote and isinstance(exc, (sqlite3.Error, OSError)):
            return ServiceUnavailableError(f"{where} failed during {what}: {type(exc).__name__}: {exc}",
                                           headers=retry)
        if not self.remote and isinstance(exc, ValueError):  # local mode's "Collection x not found"
            text = str(exc)
            if text.startswith("Collection ") and text.endswith(" not found"):
                return NotFoundError(f"{where} does not know what {what} needed: {text}")
            if text.startswith("Collection ") and text.endswith(" already exists"):
                return ConflictError(f"{where} refused {what}: {text}")
        return None

    def _call(self, what: str, fn: Callable[[QdrantClient], T]) -> T:
        """Every Qdrant call goes through here: the lock (local mode), the fast fail while
        Qdrant is down, and the mapping of its faults."""
        if self.remote and self.down is not None:
            self.ping()  # raises a 503 in <= PROBE_TIMEOUT_S while it is still down
        try:
            with self._lock:
                result = fn(self.client)
        except Exception as exc:
            self._raise_fault(exc, what)
        self._mark_up()
        return result

    def ping(self) -> None:
        """Ask Qdrant a cheap question (list collections) with a short timeout: nothing, or a 503.
        Local mode is in-process: always answers."""
        if self._probe is None:
            return
        try:
            self._probe.get_collections()
        except Exception as exc:
            self._raise_fault(exc, "a health check", timeout=self._probe_timeout)
        self._mark_up()

    def close(self) -> None:
        with self._lock:
            self.client.close()
        if self._probe is not None:
            self._probe.close()

    def qname(self, name: str) -> str:
        return self.prefix + name

    def names(self) -> list[str]:
        cols = self._call("listing collections", lambda c: c.get_collections().collections)
        return sorted(c.name[len(self.prefix):] for c in cols if c.name.startswith(self.prefix))

    def exists(self, name: str) -> bool:
        return self._call(f"checking collection {self.qname(name)!r}",
                          lambda c: c.collection_exists(self.qname(name)))

    def dimension(self, name: str) -> tuple[int, str | None]:
        """(vector size, embedder recorded at creation or None)."""
        info = self._call(f"reading collection {self.qname(name)!r}", lambda c: c.get_collection(self.qname(name)))
        vectors = info.config.params.vectors
        size = vectors.size if isinstance(vectors, models.VectorParams) else next(iter(vectors.values())).size
        meta = getattr(info.config, "metadata", None) or {}
        return int(size), meta.get("embedder")

    def create(self, name: str, dimension: int, embedder: str, owner: str | None = None) -> None:
        meta = {"embedder": embedder} | ({"owner": owner} if owner else {})
        self._call(f"creating collection {self.qname(name)!r}", lambda c: c.create_collection(
            self.qname(name), vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            metadata=meta, **self.collection_params))

    def owner(self, name: str) -> str | None:
        """The controller replica recorded as the collection's owner at creation (None: not recorded)."""
        info = self._call(f"reading collection {self.qname(name)!r}", lambda c: c.get_collection(self.qname(name)))
        return (getattr(info.config, "metadata", None) or {}).get("owner")

    def drop(self, name: str) -> None:
        self._call(f"deleting collection {self.qname(name)!r}", lambda c: c.delete_collection(self.qname(name)))

    def count(self, name: str) -> int:
        return int(self._call(f"counting {self.qname(name)!r}",
                              lambda c: c.count(self.qname(name), exact=True)).count)

    def upsert(self, name: str, keys: list[Hashable], vectors: np.ndarray, payloads: list[dict]) -> None:
        points = [models.PointStruct(id=to_qdrant_id(k), vector=v.tolist(), payload=p)
                  for k, v, p in zip(keys, vectors, payloads, strict=True)]
        with self._lock:  # local mode: one request's chunks are not interleaved with another's
            for start in range(0, len(points), 512):
                chunk = points[start:start + 512]
                self._call(f"writing {len(chunk)} points to {self.qname(name)!r}",
                           lambda c, chunk=chunk: c.upsert(self.qname(name), points=chunk, wait=True))

    def delete_points(self, name: str, keys: list[Hashable]) -> None:
        self._call(f"deleting {len(keys)} points from {self.qname(name)!r}", lambda c: c.delete(
            self.qname(name), points_selector=models.PointIdsList(points=[to_qdrant_id(k) for k in keys]),
            wait=True))

    def retrieve(self, name: str, keys: list[Hashable]) -> dict[Hashable, tuple[np.ndarray, dict]]:
        """The points Qdrant holds among ``keys``: key -> (vector, payload)."""
        records = self._call(f"reading {len(keys)} points of {self.qname(name)!r}", lambda c: c.retrieve(
            self.qname(name), ids=[to_qdrant_id(k) for k in keys], with_payload=True, with_vectors=True))
        return {to_key(r.id): (np.asarray(r.vector, np.float32), dict(r.payload or {})) for r in records}

    def scan(self, name: str, *, with_vectors: bool = True, where: Mapping[str, Any] | None = None,
             batch: int = 2048) -> Iterator[tuple[Hashable, np.ndarray | None, dict]]:
        flt = payload_filter(where) if where else None
        offset = None
        while True:
            records, offset = self._call(
                f"reading the points of {self.qname(name)!r}",
                lambda c, offset=offset: c.scroll(self.qname(name), scroll_filter=flt, limit=batch, offset=offset,
                                                  with_payload=True, with_vectors=with_vectors))
            for r in records:
                vec = np.asarray(r.vector, np.float32) if with_vectors else None
                yield to_key(r.id), vec, dict(r.payload or {})
            if offset is None:
                return


def payload_filter(where: Mapping[str, Any]) -> models.Filter:
    must: list[models.Condition] = []
    for key, value in where.items():
        if value is None:
            must.append(models.IsNullCondition(is_null=models.PayloadField(key=key)))
        elif isinstance(value, float) and not value.is_integer():
            must.append(models.FieldCondition(key=key, range=models.Range(gte=value, lte=value)))
        else:
            if isinstance(value, float):
                value = int(value)
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    return models.Filter(must=must)
