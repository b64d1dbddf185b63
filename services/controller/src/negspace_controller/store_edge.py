"""Qdrant Edge (``qdrant-edge-py``): Qdrant's Rust engine in-process, the embedded default.

Why: qdrant-client's local mode (pure Python + SQLite, an fsynced commit per write) costs 1-48 ms
per 1-point upsert at 20,000 points depending on the disk's contention, and 1-2 s to reopen or
read back every point; edge costs 0.03 ms, 0.05 s and 0.3 s (``negspace_bench.controller.engines``; the controller
README has the table). The same interface as the qdrant-client engines (``store.Store``).

Layout: ``<path>/<prefix><name>/`` per collection holds ``shard/`` (the edge shard: segments,
WAL, edge_config.json) and ``collection.json`` (vector size, embedder), written atomically
after the shard exists: a collection exists exactly when its ``collection.json`` does, so a
kill in the middle of ``create`` leaves a folder that is not a collection (the next ``create``
clears it). ``drop`` renames the folder to a hidden name first, then deletes it (leftovers are
deleted at the next start). ``<path>/.edge.lock`` is an flock held while the store is open: one
process per folder (the kernel releases it when the process dies, so a SIGKILL needs no clean-up).

Durability (measured, tests/test_store.py): ``update`` writes each operation into the WAL, a
memory-mapped file, before it returns, so once an upsert returns a SIGKILL of the process loses
nothing (the page cache holds it). ``flush`` (msync + fsync of WAL and segments) makes it
survive an OS crash too; it costs 3-80 ms here (by disk contention), 100-3000 times the 0.03 ms
write, so by default it is not done per write: a background thread flushes every shard with
unflushed writes every ``flush_interval_s`` (5 s, like a Qdrant server's default), and ``close``
flushes. An OS crash or power cut can lose the writes of the last interval (the journal's policy
too; recovery reconciles the index against what Qdrant holds). qdrant-client's local mode, by
contrast, fsyncs every write (sqlite commits: 4 fsyncs per upsert); ``flush_interval_s=0`` gives
edge that too (a flush after every write call). ``None``: only ``close`` flushes (tests, the
migration). The periodic flush also bounds the WAL: edge keeps every operation since the last
flush in it (79 MiB after 40k unflushed points).

Disk full: edge's WAL and vector files are sparse memory maps, and a write into one when the
disk is full kills the process with SIGBUS (measured on a full tmpfs) instead of failing the
call. So every write first checks the free space (``os.statvfs``, ~1 us) and answers 503 below
``min_free_bytes`` (64 MiB) plus what the write needs. Other engine errors (an IO error, a file
size limit: edge raises plain ``Exception``) and ``OSError`` become 503 naming the folder, in one
place (``_call``); a missing collection is ``NotFoundError``.

Threads: the engine is internally synchronised (a mutex on the WAL, a read-write lock on the
segments; concurrent upserts, scrolls and counts from 6 threads agree), but the Python wrapper
gives no written promise and ``close`` must not race a call, so every call on a shard holds that
shard's lock (one per collection; a scan holds it per batch, not between batches). One upsert's
chunks are not interleaved with another's.

Filters: ``where`` has ``store_qdrant.payload_filter``'s semantics (None = is null, a non-integer float
= that exact number, other numbers and strings = match). edge 0.9's ``MatchValue`` takes a Python
bool as the integer 1 and then matches nothing, so bool conditions are checked here on the
scanned payloads instead (same result: the payload value, or a list holding it, is that bool).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe
from negspace_contracts.errors import ConflictError, NotFoundError, ServiceUnavailableError
from qdrant_edge import EdgeShard

from negspace_controller.store import (
    EDGE_META_FILE,
    RETRY_AFTER_S,
    FaultState,
    is_local_mode_folder,
    to_key,
    to_qdrant_id,
)

log = logging.getLogger("negspace.controller")
T = TypeVar("T")

META_FILE = EDGE_META_FILE
SHARD_DIR = "shard"
LOCK_FILE = ".edge.lock"
DROPPED_MARK = ".dropped-"
FLUSH_INTERVAL_S = 5.0
MIN_FREE_BYTES = 64 * 2**20
CHUNK = 512
FORMAT = 1


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def edge_filter(where: Mapping[str, Any]) -> tuple[qe.Filter | None, dict[str, bool]]:
    """(the engine's filter, the bool conditions it cannot express: checked on the payloads)."""
    must: list[Any] = []
    bools: dict[str, bool] = {}
    for key, value in where.items():
        if value is None:
            must.append(qe.IsNullCondition(key))
        elif isinstance(value, bool):
            bools[key] = value
        elif isinstance(value, float) and not value.is_integer():
            must.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value, lte=value)))
        else:
            if isinstance(value, float):
                value = int(value)
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                # MatchValue takes signed 64-bit integers; beyond them compare as floats (the
                # controller refuses to store integers beyond 64 bits, so this is old data at most)
                must.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=float(value), lte=float(value))))
            else:
                must.append(qe.FieldCondition(key=key, match=qe.MatchValue(value)))
    return (qe.Filter(must=must) if must else None), bools


def _bool_matches(payload: dict, bools: dict[str, bool]) -> bool:
    for key, want in bools.items():
        v = payload.get(key)
        if not (v is want or (isinstance(v, list) and any(x is want for x in v))):
            return False
    return True


@dataclass
class _Shard:
    shard: Any  # qdrant_edge.EdgeShard
    lock: threading.RLock = field(default_factory=threading.RLock)
    dirty: bool = False  # writes since the last flush
    closed: bool = False


class EdgeStore(FaultState):
    remote = False
    engine = "edge"

    def __init__(self, path: str, *, prefix: str = "negspace_", flush_interval_s: float | None = FLUSH_INTERVAL_S,
                 min_free_bytes: int = MIN_FREE_BYTES) -> None:
        if "/" in prefix or prefix.startswith(".") or "\0" in prefix:  # hidden names are the lock's and drops'
            raise ValueError(f"collection prefix {prefix!r} cannot start edge folder names: use letters, "
                             "digits, '_' or '-'")
        self.prefix = prefix
        self.min_free_bytes = int(min_free_bytes)
        self._temporary = path == ":memory:"
        if self._temporary:  # edge has no memory mode: a folder of our own, removed at close
            self.path = Path(tempfile.mkdtemp(prefix="negspace-edge-memory-"))
            self.where = ":memory:"
        else:
            self.path = Path(path)
            self.where = str(path)
            if is_local_mode_folder(self.path):
                raise ValueError(f"{self.path} holds a qdrant-client local-mode store, which edge cannot "
                                 f"open: migrate it (python -m negspace_controller.migrate_store {self.path}) "
                                 "or run with --qdrant-engine local")
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"embedded Qdrant storage {self.path} is in use by another process (it holds "
                               f"{self.path / LOCK_FILE}): one controller per --qdrant-path") from None
        self.down = None
        self.down_since = None
        self._registry = threading.RLock()  # opening, creating, dropping and closing shards
        self._shards: dict[str, _Shard] = {}
        self._closed = False
        for leftover in self.path.glob(f".*{DROPPED_MARK}*"):  # a drop killed half-way
            shutil.rmtree(leftover, ignore_errors=True)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.flush_every_write = flush_interval_s is not None and flush_interval_s <= 0
        if flush_interval_s is not None and flush_interval_s > 0:
            self._flusher = threading.Thread(target=self._flush_loop, args=(float(flush_interval_s),),
                                             name="edge-flush", daemon=True)
            self._flusher.start()

    # ------------------------------------------------------------------ the one fault mapping
    def describe(self) -> str:
        return f"embedded Qdrant (edge) storage {self.path}"

    def _fault(self, exc: BaseException, what: str, timeout: float | None = None) -> Exception | None:
        """The negspace error for a failed engine call, or None when ``exc`` is not a store fault
        (a TypeError from a bad argument is a bug and stays one)."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if isinstance(exc, OSError):
            return ServiceUnavailableError(f"{self.describe()} failed during {what}: {type(exc).__name__}: {exc}",
                                           headers=retry)
        if type(exc) is Exception:  # everything qdrant_edge raises (IO, WAL, engine) is a bare Exception
            text = str(exc)
            if "WouldBlock" in text:
                text += " (another process has this shard open)"
            return ServiceUnavailableError(f"{self.describe()} failed during {what}: {text}", headers=retry)
        return None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Every engine call goes through here: the mapping of its faults."""
        try:
            result = fn()
        except (NotFoundError, ConflictError, ServiceUnavailableError):
            raise
        except Exception as exc:
            self._raise_fault(exc, what)
        self._mark_up()
        return result

    def _check_space(self, what: str, need: int = 0) -> None:
        """503 before a write that could meet a full disk (edge would die of SIGBUS)."""
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            self._raise_fault(exc, what)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes + need:
            self._raise_fault(OSError(28, f"only {free / 2**20:.0f} MiB free, {self.min_free_bytes / 2**20:.0f} "
                                      "MiB kept in reserve (edge writes through memory maps: a full disk would "
                                      "kill the process); free some space"), what)

    def ping(self) -> None:
        """In-process: nothing to ask, but a disk that is (nearly) full is reported, as a 503."""
        self._check_space("a health check")

    # ------------------------------------------------------------------ shards
    def qname(self, name: str) -> str:
        return self.prefix + name

    def _dir(self, name: str) -> Path:
        return self.path / self.qname(name)

    def _meta(self, name: str) -> dict | None:
        try:
            return json.loads((self._dir(name) / META_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._raise_fault(exc if isinstance(exc, OSError) else OSError(f"unreadable {META_FILE}: {exc}"),
                              f"reading collection {self.qname(name)!r}")

    def _missing(self, name: str, what: str) -> NotFoundError:
        return NotFoundError(f"{self.describe()} has no collection {self.qname(name)!r} ({what})")

    def _shard(self, name: str, what: str) -> _Shard:
        """The open shard of a collection (opened on first use), or NotFoundError."""
        sh = self._shards.get(name)
        if sh is not None:
            return sh
        with self._registry:
            if self._closed:
                raise ServiceUnavailableError(f"{self.describe()} is closed", headers={"Retry-After": "5"})
            sh = self._shards.get(name)
            if sh is None:
                if self._meta(name) is None:
                    raise self._missing(name, what)
                shard = self._call(f"opening collection {self.qname(name)!r}",
                                   lambda: EdgeShard.load(str(self._dir(name) / SHARD_DIR)))
                sh = self._shards[name] = _Shard(shard)
        return sh

    def _on(self, name: str, what: str, fn: Callable[[Any], T], *, write: bool = False) -> T:
        """Run ``fn(shard)`` under the shard's lock, faults mapped."""
        sh = self._shard(name, what)
        with sh.lock:
            if sh.closed:  # dropped (or the store closed) while we waited
                raise self._missing(name, what)
            if write:
                sh.dirty = True
            return self._call(what, lambda: fn(sh.shard))

    def names(self) -> list[str]:
        try:
            dirs = [d.name for d in self.path.iterdir() if d.name.startswith(self.prefix) and (d / META_FILE).is_file()]
        except OSError as exc:
            self._raise_fault(exc, "listing collections")
        return sorted(d[len(self.prefix):] for d in dirs)

    def exists(self, name: str) -> bool:
        return self._meta(name) is not None

    def dimension(self, name: str) -> tuple[int, str | None]:
        """(vector size, embedder recorded at creation or None)."""
        meta = self._meta(name)
        if meta is None:
            raise self._missing(name, "reading its vector size")
        return int(meta["dimension"]), meta.get("embedder")

    def owner(self, name: str) -> str | None:
        """The controller replica recorded as the collection's owner at creation (None: not recorded)."""
        meta = self._meta(name)
        if meta is None:
            raise self._missing(name, "reading its owner")
        return meta.get("owner")

    def create(self, name: str, dimension: int, embedder: str, owner: str | None = None) -> None:
        what = f"creating collection {self.qname(name)!r}"
        self._check_space(what)
        with self._registry:
            if self._meta(name) is not None:
                raise ConflictError(f"{self.describe()} refused {what}: it exists")
            folder = self._dir(name)

            def make() -> Any:
                if folder.exists():  # a create killed before collection.json: not a collection yet
                    shutil.rmtree(folder)
                folder.mkdir()
                shard = EdgeShard.create(str(folder / SHARD_DIR), qe.EdgeConfig(
                    vectors=qe.EdgeVectorParams(size=int(dimension), distance=qe.Distance.Cosine)))
                try:
                    shard.flush()
                    meta = {"format": FORMAT, "dimension": int(dimension), "embedder": embedder,
                            "engine": "qdrant-edge"} | ({"owner": owner} if owner else {})
                    _write_json_atomic(folder / META_FILE, meta)
                except BaseException:
                    shard.close()
                    raise
                return shard

            self._shards[name] = _Shard(self._call(what, make))

    def drop(self, name: str) -> None:
        """Delete a collection; dropping one that does not exist is a no-op (as in local mode)."""
        what = f"deleting collection {self.qname(name)!r}"
        with self._registry:
            sh = self._shards.pop(name, None)
            if sh is not None:
                with sh.lock:
                    sh.closed = True
                    with contextlib.suppress(Exception):
                        sh.shard.close()
            folder = self._dir(name)
            if not folder.exists():
                return
            gone = self.path / f".{folder.name}{DROPPED_MARK}{uuid.uuid4().hex}"
            self._call(what, lambda: os.replace(folder, gone))  # atomic: no half-deleted collection
        shutil.rmtree(gone, ignore_errors=True)

    def count(self, name: str) -> int:
        return int(self._on(name, f"counting {self.qname(name)!r}",
                            lambda s: s.count(qe.CountRequest(exact=True))))

    def upsert(self, name: str, keys: list[Hashable], vectors: np.ndarray, payloads: list[dict]) -> None:
        what = f"writing {len(keys)} points to {self.qname(name)!r}"
        vectors = np.asarray(vectors, np.float32)
        # what the write adds (WAL + segment, with slack): vectors as float32, payloads roughly as text
        self._check_space(what, need=4 * (vectors.size * 4 + sum(len(repr(p)) for p in payloads)))
        points = [qe.Point(id=to_qdrant_id(k), vector=v.tolist(), payload=p)
                  for k, v, p in zip(keys, vectors, payloads, strict=True)]
        sh = self._shard(name, what)
        with sh.lock:  # one request's chunks are not interleaved with another's
            for start in range(0, len(points), CHUNK):
                chunk = points[start:start + CHUNK]
                self._on(name, f"writing {len(chunk)} points to {self.qname(name)!r}",
                         lambda s, chunk=chunk: s.update(qe.UpdateOperation.upsert_points(chunk)), write=True)
            self._after_write(name, what)

    def delete_points(self, name: str, keys: list[Hashable]) -> None:
        what = f"deleting {len(keys)} points from {self.qname(name)!r}"
        self._check_space(what)
        ids = [to_qdrant_id(k) for k in keys]
        sh = self._shard(name, what)
        with sh.lock:
            self._on(name, what, lambda s: s.update(qe.UpdateOperation.delete_points(ids)), write=True)
            self._after_write(name, what)

    def _after_write(self, name: str, what: str) -> None:
        """With ``flush_interval_s=0``: the write is fsynced before the call returns (a failed flush
        is a 503: the write is applied but its durability unknown, so the caller reconciles)."""
        if self.flush_every_write:
            self._on(name, f"flushing after {what}", lambda s: s.flush())
            self._shards[name].dirty = False

    def retrieve(self, name: str, keys: list[Hashable]) -> dict[Hashable, tuple[np.ndarray, dict]]:
        """The points the shard holds among ``keys``: key -> (vector, payload)."""
        ids = [to_qdrant_id(k) for k in keys]
        records = self._on(name, f"reading {len(keys)} points of {self.qname(name)!r}",
                           lambda s: s.retrieve(ids, True, True))
        return {to_key(r.id): (np.asarray(r.vector, np.float32), dict(r.payload or {})) for r in records}

    def scan(self, name: str, *, with_vectors: bool = True, where: Mapping[str, Any] | None = None,
             batch: int = 2048) -> Iterator[tuple[Hashable, np.ndarray | None, dict]]:
        flt, bools = edge_filter(where) if where else (None, {})
        what = f"reading the points of {self.qname(name)!r}"
        offset = None
        while True:
            records, offset = self._on(name, what, lambda s, offset=offset: s.scroll(qe.ScrollRequest(
                offset=offset, limit=batch, filter=flt, with_payload=True, with_vector=with_vectors)))
            for r in records:
                payload = dict(r.payload or {})
                if bools and not _bool_matches(payload, bools):
                    continue
                vec = np.asarray(r.vector, np.float32) if with_vectors else None
                yield to_key(r.id), vec, payload
            if offset is None:
                return

    # ------------------------------------------------------------------ flushing and closing
    def flush(self) -> None:
        """Make every write so far survive an OS crash (the background thread does this)."""
        for name, sh in list(self._shards.items()):
            with sh.lock:
                if sh.closed or not sh.dirty:
                    continue
                sh.dirty = False
                try:
                    self._call(f"flushing {self.qname(name)!r}", sh.shard.flush)
                except ServiceUnavailableError:
                    sh.dirty = True
                    raise

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except ServiceUnavailableError:
                pass  # logged by _mark_down; retried next interval
            except Exception:  # pragma: no cover - never let the flusher die silently
                log.exception("%s: periodic flush failed", self.describe())

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        with self._registry:
            if self._closed:
                return
            self._closed = True
            for name, sh in list(self._shards.items()):
                with sh.lock:
                    sh.closed = True
                    try:
                        sh.shard.flush()
                        sh.shard.close()
                    except Exception:
                        log.exception("%s: could not close collection %r cleanly (its WAL replays at the "
                                      "next start)", self.describe(), self.qname(name))
            self._shards.clear()
            self._lock_file.close()  # releases the flock
            if self._temporary:
                shutil.rmtree(self.path, ignore_errors=True)
