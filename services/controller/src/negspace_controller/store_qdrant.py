"""The two qdrant-client engines behind ``store.Store``: ``ServerStore`` (a Qdrant server, over
HTTP) and ``LocalStore`` (qdrant-client's local mode: a folder or ``:memory:``, pure Python +
SQLite). What they share (every collection and point call, through one ``QdrantClient``) is
``QdrantClientStore``; each adds only what its mode has. Local mode is not thread-safe, so there
every call holds one lock; the server client (httpx) is, so server calls run concurrently.

Faults are mapped to negspace errors in ONE place per engine (``_fault``, used by ``_call``): a
Qdrant that is unreachable, slow beyond ``timeout`` seconds, answering 5xx/429/401/403 or garbage
becomes a ``ServiceUnavailableError`` (HTTP 503, retryable) naming Qdrant and its URL; a 404
becomes ``NotFoundError``. While a server is known to be down, every call first asks it a cheap
question with a short timeout, so queued requests fail in seconds instead of each waiting
``timeout``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

import httpx
import numpy as np
from negspace_contracts.errors import ConflictError, NotFoundError, ServiceUnavailableError
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from negspace_controller.store import PROBE_TIMEOUT_S, RETRY_AFTER_S, FaultState, to_key, to_qdrant_id

T = TypeVar("T")
HINT = "; retry when it is healthy again (GET /health says)"


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


class QdrantClientStore(FaultState):
    """Every ``Store`` call through one ``QdrantClient``; the engines below say how it is opened,
    locked, probed and how their own faults read."""

    engine: str
    remote: bool
    timeout = 30.0
    collection_params: dict[str, int] = {}  # noqa: RUF012 - read only; a server sets its own
    _lock: contextlib.AbstractContextManager = contextlib.nullcontext()

    def __init__(self, client: QdrantClient, where: str, prefix: str) -> None:
        self.client = client
        self.where = where
        self.prefix = prefix
        self.down: str | None = None  # why the last call failed; None once one succeeds
        self.down_since: float | None = None

    # ------------------------------------------------------------------ the one fault mapping
    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        """The negspace error for a failed Qdrant call, or None when ``exc`` is not a Qdrant fault
        (what both modes can raise; each engine adds its own)."""
        where = self.describe()
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if isinstance(exc, UnexpectedResponse):
            status = exc.status_code
            if status == 404:
                return NotFoundError(f"{where} does not know what {what} needed: {_body(exc)}")
            if status == 409:
                return ConflictError(f"{where} refused {what}: {_body(exc)}")
            if status in (401, 403):
                return ServiceUnavailableError(f"{where} refused {what} with {status}: check "
                                               f"--qdrant-api-key{HINT}", headers=retry)
            return ServiceUnavailableError(f"{where} answered {status} to {what}: {_body(exc)}{HINT}",
                                           headers=retry)
        if isinstance(exc, ResourceExhaustedResponse):
            return ServiceUnavailableError(f"{where} is overloaded ({exc.message}) during {what}{HINT}",
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
            return ServiceUnavailableError(f"{where} {why}{HINT}", headers=retry)
        return None

    def _call(self, what: str, fn: Callable[[QdrantClient], T]) -> T:
        """Every Qdrant call goes through here: the lock (local mode) and the mapping of its faults."""
        try:
            with self._lock:
                result = fn(self.client)
        except Exception as exc:
            self._raise_fault(exc, what)
        self._mark_up()
        return result

    def ping(self) -> None:
        """Local mode is in-process: always answers (a server asks its probe client)."""

    def close(self) -> None:
        with self._lock:
            self.client.close()

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


class ServerStore(QdrantClientStore):
    """A Qdrant server at ``url``: collections are created with ``collection_params`` (shards,
    copies, write consistency); a second client with a short timeout probes it while it is down."""

    engine = "server"
    remote = True

    def __init__(self, url: str, *, api_key: str | None = None, prefix: str = "negspace_", timeout: float = 30.0,
                 probe_timeout: float = PROBE_TIMEOUT_S, collection_params: Mapping[str, int] | None = None) -> None:
        # qdrant-client rounds timeouts up to whole seconds; without one, httpx's 5 s default applies
        super().__init__(QdrantClient(url=url, api_key=api_key, timeout=math.ceil(timeout)), url, prefix)
        # shard_number / replication_factor / write_consistency_factor of every new collection
        self.collection_params = dict(collection_params or {})
        self.timeout = float(timeout)
        self._probe_timeout = math.ceil(min(probe_timeout, timeout))
        self._probe = QdrantClient(url=url, api_key=api_key, check_compatibility=False, timeout=self._probe_timeout)

    def describe(self) -> str:
        return f"Qdrant at {self.where}"

    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        err = super()._fault(exc, what, timeout)
        if err is None and isinstance(exc, json.JSONDecodeError):  # qdrant-client does not wrap these
            return ServiceUnavailableError(f"{self.describe()} answered {what} with something that is not "
                                           f"Qdrant's API (not JSON){HINT}", headers={"Retry-After": str(RETRY_AFTER_S)})
        return err

    def _call(self, what: str, fn: Callable[[QdrantClient], T]) -> T:
        """The fast fail while Qdrant is down, then the call."""
        if self.down is not None:
            self.ping()  # raises a 503 in <= PROBE_TIMEOUT_S while it is still down
        return super()._call(what, fn)

    def ping(self) -> None:
        """Ask Qdrant a cheap question (list collections) with a short timeout: nothing, or a 503."""
        try:
            self._probe.get_collections()
        except Exception as exc:
            self._raise_fault(exc, "a health check", timeout=self._probe_timeout)
        self._mark_up()

    def close(self) -> None:
        super().close()
        self._probe.close()


class LocalStore(QdrantClientStore):
    """qdrant-client's local mode in ``path`` (``:memory:``: nothing kept): one lock around every call."""

    engine = "local"
    remote = False

    def __init__(self, path: str, *, prefix: str = "negspace_",
                 collection_params: Mapping[str, int] | None = None) -> None:
        if collection_params:
            raise ValueError(f"{', '.join(collection_params)} configure a Qdrant server's collections; "
                             "local mode keeps one shard and one copy in this process")
        client = QdrantClient(location=":memory:") if path == ":memory:" else QdrantClient(path=path)
        super().__init__(client, path or "", prefix)
        self._lock = threading.RLock()

    def describe(self) -> str:
        return f"local Qdrant storage {self.where}"

    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        err = super()._fault(exc, what, timeout)
        if err is not None:
            return err
        if isinstance(exc, (sqlite3.Error, OSError)):
            return ServiceUnavailableError(f"{self.describe()} failed during {what}: {type(exc).__name__}: {exc}",
                                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, ValueError):  # local mode's "Collection x not found"
            text = str(exc)
            if text.startswith("Collection ") and text.endswith(" not found"):
                return NotFoundError(f"{self.describe()} does not know what {what} needed: {text}")
            if text.startswith("Collection ") and text.endswith(" already exists"):
                return ConflictError(f"{self.describe()} refused {what}: {text}")
        return None


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
