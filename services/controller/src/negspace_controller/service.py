"""The controller's domain layer: collections = a Qdrant collection + an exact in-memory index.

Writes to one collection are serialised (an asyncio lock); NumPy, Qdrant and embedding work
runs in worker threads so the event loop (and /health) stays responsive. Reads take only the
index's short thread lock, so they are not blocked while a write is embedding.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from negspace_contracts.controller import (
    COLLECTION_NAME_PATTERN,
    AcceptRequest,
    AcceptResponse,
    CollectionInfo,
    DenseItem,
    DenseResponse,
    MetricsRequest,
    MetricsResponse,
    Neighbor,
    PointIn,
    SimilarResponse,
    UpsertPointsResponse,
    controller_for,
)
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError

from negspace_controller import diversity, threads
from negspace_controller.ann import ApproxDensityIndex
from negspace_controller.batching import BatchingEncoder
from negspace_controller.embedding import Embedder
from negspace_controller.index import DensityIndex
from negspace_controller.journal import Journal, JournalCorrupt, covered_seqs, dangling_rows, replay, state_of
from negspace_controller.store import RESERVED_KEYS, SEQ_KEY, TEXT_KEY, Store, to_key

log = logging.getLogger("negspace.controller")
_NAME = re.compile(COLLECTION_NAME_PATTERN)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequestError(f"invalid collection name {name!r}: use 1-128 letters, digits, '_' or '-', "
                              "starting with a letter or digit", param="name")
    return name


@dataclass
class _Collection:
    name: str
    index: DensityIndex
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Keys whose last write to Qdrant failed with an unknown outcome (timeout, dropped connection,
    # 5xx mid-batch): Qdrant may or may not hold it. Reconciled from Qdrant before the next write.
    unsure: set[Hashable] = field(default_factory=set)


class Controller:
    def __init__(self, embedder: Embedder, store: Store, *, knn_capacity: int = 32,
                 snapshot_dir: str | Path | None = None,
                 observe: Callable[[str, float], None] | None = None, index_mode: str = "exact",
                 approx_candidates: int | None = None, index_mmap: bool | None = None,
                 replica: str | None = None, replicas: Sequence[str] = ()) -> None:
        self.embedder = embedder
        # Which collections this replica serves: see ``owner``. No replicas: it serves them all.
        self.replica = replica
        self.replicas = list(replicas)
        if self.replicas and replica not in self.replicas:
            raise ValueError(f"replica {replica!r} is not one of the replicas {self.replicas}")
        if index_mode not in ("exact", "approximate"):
            raise ValueError(f"index_mode must be 'exact' or 'approximate', not {index_mode!r}")
        self.index_mode = index_mode
        self.blas_threads = threads.current()  # what OpenBLAS reports (set by --blas-threads at start-up)
        self.approx_candidates = approx_candidates
        # ``observe(stage, seconds)``: the app feeds its stage histogram (embed_batch, lock_wait,
        # check, qdrant_write, index_add); a no-op by default
        self.observe = observe or (lambda stage, seconds: None)
        self.encoder = BatchingEncoder(embedder, observe=self.observe)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        # memory-mapped vectors and lists (beside the index log): by default in approximate mode,
        # the one meant for collections too large to keep twice in memory
        self.index_mmap = (index_mode == "approximate") if index_mmap is None else index_mmap
        if self.index_mmap and self.snapshot_dir is not None:
            shutil.rmtree(self.snapshot_dir / "arrays", ignore_errors=True)  # no index of this process yet
        self.store = store
        self.knn_capacity = knn_capacity
        self._cols: dict[str, _Collection] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self.loaded_points = 0
        self.from_snapshot: set[str] = set()  # collections whose lists came from a snapshot
        self._probe: asyncio.Future | None = None  # the Qdrant probe /health calls share

    # ------------------------------------------------------------------ health
    def health_info(self) -> dict:
        """What ``/health`` reports: the embedder (and what runs it), where Qdrant is and which engine (server, edge,
        local), points held per collection."""
        return dict(embedder=self.embedder.name, dimension=self.embedder.dimension,
                    embed_backend=self.embedder.backend, qdrant=self.store.where,
                    qdrant_engine=self.store.engine, collections={name: len(c.index) for name, c in self._cols.items()},
                    knn_capacity=self.knn_capacity, index_mode=self.index_mode,
                    blas_threads=self.blas_threads, replica=self.replica, replicas=len(self.replicas) or 1)

    async def qdrant_problem(self) -> str | None:
        """None when Qdrant answers, else why not. One short probe is shared by concurrent
        callers (server mode), so a hung Qdrant cannot pile up threads."""
        task = self._probe
        if task is None or task.done():
            task = self._probe = asyncio.ensure_future(asyncio.to_thread(self.store.ping))
        try:
            await asyncio.shield(task)
        except ServiceUnavailableError as exc:
            return exc.message
        return None

    # ------------------------------------------------------------------ ownership
    def owner(self, name: str, recorded: str | None) -> str | None:
        """The replica that serves collection ``name``: the one recorded when it was created (the
        replica the orchestrator sent the PUT to: its rendezvous pick, or the replica of the run's
        family), else, for a collection made before owners were recorded, the orchestrator's own
        rendezvous rule (``controller_for``) over ``replicas``. None: no replicas configured, this
        controller serves every collection."""
        if not self.replicas:
            return None
        return recorded or controller_for(name, self.replicas)

    def _check_owner(self, name: str) -> None:
        """Refuse (409) a collection another replica owns, BEFORE anything of it is loaded: only its
        owner ever holds it in memory, and the owner receives all of its writes, so no replica
        answers from a copy that misses writes."""
        if not self.replicas:
            return
        owner = self.owner(name, self.store.owner(name))
        if owner != self.replica:
            raise ConflictError(
                f"collection {name!r} belongs to controller replica {owner}, not to this one ({self.replica}); "
                f"send its calls to {owner} (the orchestrator records each run's replica). This replica "
                "does not load it, so that no answer comes from a copy that misses the owner's writes",
                param="name")

    # ------------------------------------------------------------------ collections
    async def _get(self, name: str) -> _Collection:
        check_name(name)
        col = self._cols.get(name)
        if col is not None:
            return col
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            col = self._cols.get(name)
            if col is None:
                if not await asyncio.to_thread(self.store.exists, name):
                    raise NotFoundError(f"collection {name!r} does not exist; create it with PUT "
                                        f"/collections/{name}", param="name")
                await asyncio.to_thread(self._check_owner, name)
                col = await asyncio.to_thread(self._load, name)
                self._cols[name] = col
        return col

    def _load(self, name: str) -> _Collection:
        dim, embedder = self.store.dimension(name)
        if dim != self.embedder.dimension:
            raise ConflictError(f"collection {name!r} holds {dim}-dimensional vectors"
                                f"{' from ' + embedder if embedder else ''}, but this controller's "
                                f"embedder {self.embedder.name} gives {self.embedder.dimension}")
        started = time.monotonic()
        journal = self._journal(name)
        snap, records = None, []
        if journal is not None:
            try:
                snap, records = journal.read(self.knn_capacity)
            except JournalCorrupt as exc:
                log.warning("collection %s: %s; the lists are rebuilt from Qdrant", name, exc)
                journal.drop()
        covered = covered_seqs(snap, records) if (snap is not None or records) else set()
        keys, vecs, texts, seqs = [], [], [], []
        pending: list[tuple[Hashable, np.ndarray, str, int]] = []  # in Qdrant, never in the log
        for key, vec, payload in self.store.scan(name, with_vectors=True):
            text, seq = str(payload.get(TEXT_KEY, "")), int(payload.get(SEQ_KEY, -1))
            if covered and seq not in covered:
                pending.append((key, vec, text, seq))
                continue
            keys.append(key)
            vecs.append(vec)
            texts.append(text)
            seqs.append(seq if seq >= 0 else len(seqs))
        index = self._new_index(dim, max(1024, len(keys) + len(pending)), name)

        def progress(done: int, total: int) -> None:
            log.info("collection %s: %d/%d", name, done, total)

        if keys:
            log.info("collection %s: indexing %d points", name, len(keys))
            extra = {}
            if isinstance(index, ApproxDensityIndex):
                extra = {"graph": journal.graph_path() if journal is not None and covered else None,
                         "progress": progress}
            index.load(keys, np.stack(vecs), texts, seqs, compute=False, **extra)
        rebuilt = False
        if covered:
            replay(index, snap, records, progress=progress)
            lost = dangling_rows(index)  # the log names points Qdrant no longer holds
            if lost.size:
                index._recompute(lost)
            log.info("collection %s: neighbour lists from the index log (%d records replayed, %d lists "
                     "recomputed for points Qdrant lost, %d points the log missed)", name, len(records),
                     lost.size, len(pending))
            self.from_snapshot.add(name)
        elif keys:
            log.info("collection %s: rebuilding every neighbour list from Qdrant's vectors (no index log)", name)
            index.rebuild(progress=progress)
            rebuilt = True
        index.journal = journal
        if journal is not None and isinstance(index, ApproxDensityIndex):
            journal.save_extra = index.save_graph
        for key, vec, text, seq in sorted(pending, key=lambda p: p[3]):
            index.add(key, vec, text, seq=seq if seq >= 0 else None)
        if journal is not None and (rebuilt or journal.wants_compaction(index.n, index.capacity)):
            journal.compact(state_of(index), background=False)
        log.info("collection %s: %d points loaded in %.1f s", name, index.n, time.monotonic() - started)
        self.loaded_points += index.n
        return _Collection(name, index)

    def _new_index(self, dim: int, rows: int = 1024, name: str | None = None) -> DensityIndex:
        storage = self._arrays_dir(name) if name is not None else None
        if self.index_mode == "approximate":
            return ApproxDensityIndex(dim, self.knn_capacity, initial_rows=rows, candidates=self.approx_candidates,
                                      storage_dir=storage)
        return DensityIndex(dim, self.knn_capacity, initial_rows=rows, storage_dir=storage)

    def _arrays_dir(self, name: str) -> Path | None:
        """A new folder for the memory-mapped arrays of a new index of ``name`` (``index_mmap``), the
        collection's older ones removed; None: in memory."""
        if not self.index_mmap or self.snapshot_dir is None:
            return None
        self._remove_arrays(name)
        return self.snapshot_dir / "arrays" / f"{self.store.qname(name)}.{uuid.uuid4().hex[:12]}"

    def _remove_arrays(self, name: str) -> None:
        """Remove the collection's memory-mapped array folders (an index still holding one keeps its
        mapping until it is dropped: Linux unlinks lazily)."""
        if self.snapshot_dir is None:
            return
        for old in (self.snapshot_dir / "arrays").glob(f"{self.store.qname(name)}.*"):  # no '.' in names
            shutil.rmtree(old, ignore_errors=True)

    def _journal(self, name: str) -> Journal | None:
        return Journal(self.snapshot_dir, self.store.qname(name)) if self.snapshot_dir else None

    def save_snapshots(self) -> None:
        """Compact every loaded collection's log into a snapshot (shutdown): the next start reads one
        file instead of replaying the log. A kill instead of a shutdown loses nothing either."""
        for name, col in list(self._cols.items()):
            j = col.index.journal
            if j is None:
                continue
            with col.index.lock:
                j.compact(state_of(col.index), background=False)
                j.close()
            log.info("collection %s: snapshot of %d points written", name, len(col.index))

    def _drop_snapshot(self, name: str) -> None:
        col = self._cols.get(name)
        j = col.index.journal if col is not None else self._journal(name)
        if j is not None:
            j.drop()
        self._remove_arrays(name)

    def _info(self, col: _Collection) -> CollectionInfo:
        return CollectionInfo(name=col.name, count=len(col.index), dimension=col.index.dim,
                              embedder=self.embedder.name)

    async def create(self, name: str) -> tuple[CollectionInfo, bool]:
        check_name(name)
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            created = False
            if not await asyncio.to_thread(self.store.exists, name):
                self._drop_snapshot(name)
                await asyncio.to_thread(self.store.create, name, self.embedder.dimension, self.embedder.name,
                                        self.replica)
                index = self._new_index(self.embedder.dimension, name=name)
                index.journal = self._journal(name)
                if index.journal is not None and isinstance(index, ApproxDensityIndex):
                    index.journal.save_extra = index.save_graph
                self._cols[name] = _Collection(name, index)
                created = True
        return self._info(await self._get(name)), created

    async def info(self, name: str) -> CollectionInfo:
        return self._info(await self._get(name))

    async def delete(self, name: str) -> None:
        col = await self._get(name)
        async with col.write_lock:
            try:
                await asyncio.to_thread(self.store.drop, name)
            except ServiceUnavailableError:
                # it may have been dropped anyway: forget the in-memory copy, the next request
                # asks Qdrant again (404, or a reload of what it still holds)
                self._cols.pop(name, None)
                raise
            self._drop_snapshot(name)
            self._cols.pop(name, None)

    async def warm_up(self, max_wait_s: float = 30.0) -> None:
        """Load every existing collection this replica owns (start-up), so the first request does
        not pay for it; drop what it holds of the others (an in-memory copy, its index log and
        arrays: left from before, when every replica loaded every collection, or from another
        replica set). While Qdrant is unreachable it retries (backing off to ``max_wait_s``);
        requests meanwhile get a 503 naming Qdrant and /health says why."""
        wait = 1.0
        while True:
            try:
                names = await asyncio.to_thread(self.store.names)
                break
            except ServiceUnavailableError as exc:
                log.warning("start-up: %s; trying again in %.0f s", exc.message, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, max_wait_s)
        others = []
        for name in names:
            try:
                if self.replicas:
                    owner = self.owner(name, await asyncio.to_thread(self.store.owner, name))
                    if owner != self.replica:
                        others.append(name)
                        self.release(name)
                        continue
                await self._get(name)
            except Exception as exc:  # one bad collection must not stop the others
                log.warning("collection %s not loaded: %s", name, exc)
        if others:
            log.info("start-up: %d collections belong to other replicas and are not loaded here (%s%s)",
                     len(others), ", ".join(others[:5]), ", ..." if len(others) > 5 else "")

    def release(self, name: str) -> None:
        """Forget this replica's copy of a collection it does not own: the in-memory index and its
        index log and arrays (Qdrant keeps the points; the owner's copy is the one kept current)."""
        col = self._cols.pop(name, None)
        j = col.index.journal if col is not None else self._journal(name)
        if j is not None and (col is not None or j.has_files()):
            log.info("collection %s: dropping this replica's copy (it belongs to another replica)", name)
            j.drop()
        self._remove_arrays(name)

    # ------------------------------------------------------------------ points
    @staticmethod
    def _check_payloads(points: list[PointIn], param: str = "points") -> None:
        for i, p in enumerate(points):
            where = f"{param}[{i}]" if param == "points" else param
            dotted = where.replace("[", ".").replace("]", "")
            bad = RESERVED_KEYS & p.payload.keys()
            if bad:
                raise BadRequestError(f"{where}.payload uses reserved key(s) {sorted(bad)}: the "
                                      "controller stores the text and its sequence there", param=f"{dotted}.payload")
            why = _unstorable(p.payload)
            if why:
                raise BadRequestError(f"{where}.payload holds {why}", param=f"{dotted}.payload")
            _check_id(p.id, f"{where}.id", f"{dotted}.id")

    async def upsert(self, name: str, points: list[PointIn]) -> UpsertPointsResponse:
        self._check_payloads(points)
        col = await self._get(name)
        last: dict[Hashable, PointIn] = {}
        for p in points:  # a repeated id in one request: the last one wins
            last.pop(to_key(p.id), None)
            last[to_key(p.id)] = p
        index = col.index
        with index.lock:  # a first look without the write lock: embed outside it, batched with others
            stale = [p.text for k, p in last.items() if k not in index or index.texts[index.row_of[k]] != p.text]
        if stale:
            await self.encoder.encode(stale)
        waited = time.perf_counter()
        async with col.write_lock:
            self.observe("lock_wait", time.perf_counter() - waited)
            if self._cols.get(name) is not col:
                raise NotFoundError(f"collection {name!r} was deleted", param="name")
            if col.unsure:
                await asyncio.to_thread(self._reconcile, col)
            with index.lock:
                current = {k: index.texts[index.row_of[k]] for k in last if k in index}
            changed = [k for k, p in last.items() if current.get(k) != p.text]
            truncated: dict[Hashable, bool] = {}
            vecs = np.zeros((0, index.dim), np.float32)
            if changed:
                vecs, trunc = await self.encoder.encode([last[k].text for k in changed])
                truncated = dict(zip(changed, trunc, strict=True))
            await asyncio.to_thread(self._apply, col, last, changed, vecs, current)
        return UpsertPointsResponse(ids=[p.id for p in points],
                                    truncated=[truncated.get(to_key(p.id), False) for p in points])

    def _apply(self, col: _Collection, last: dict, changed: list, vecs: np.ndarray, current: dict) -> None:
        index = col.index
        changed_set = set(changed)
        keys, payloads, rows = [], [], []
        with index.lock:
            seq = index.next_seq
            for k, p in last.items():
                if k in changed_set:
                    s = seq
                    seq += 1
                    v = None  # filled from the fresh embeddings below
                else:  # same text: keep vector and sequence, update the payload only
                    s = index.seq_of(k)
                    v = index.vectors[index.row_of[k]].copy()
                keys.append(k)
                payloads.append({**p.payload, TEXT_KEY: p.text, SEQ_KEY: s})
                rows.append(v)
        pos = {k: i for i, k in enumerate(changed)}
        vectors = np.stack([vecs[pos[k]] if k in changed_set else r for k, r in zip(keys, rows, strict=True)])
        # System of record first: if Qdrant refuses, the index is untouched. A timeout or a failure
        # mid-batch leaves Qdrant's state unknown: those keys are reconciled before the next write.
        t = time.perf_counter()
        try:
            self.store.upsert(col.name, keys, vectors, payloads)
        except ServiceUnavailableError:
            col.unsure.update(keys)
            raise
        t1 = time.perf_counter()
        self.observe("qdrant_write", t1 - t)
        with index.lock:
            for k, v, pl in zip(keys, vectors, payloads, strict=True):
                if k not in changed_set:
                    continue
                if k in index:
                    index.remove(k)
                index.add(k, v, pl[TEXT_KEY], seq=pl[SEQ_KEY])
        self.observe("index_add", time.perf_counter() - t1)

    async def accept(self, name: str, req: AcceptRequest) -> AcceptResponse:
        """Check ``req.point`` and insert it unless too similar (or when forced), atomically per
        collection. Embedding happens before the lock (batched with concurrent calls); inside it
        only the exact search, Qdrant's write and the index insert run, in one worker thread."""
        point = req.point
        self._check_payloads([point], param="point")
        col = await self._get(name)
        key = to_key(point.id)
        qvec, trunc = await self.encoder.encode([point.text], query=True)
        dvec = qvec if not self.embedder.query_instruction else (await self.encoder.encode([point.text]))[0]
        waited = time.perf_counter()
        async with col.write_lock:
            self.observe("lock_wait", time.perf_counter() - waited)
            if self._cols.get(name) is not col:
                raise NotFoundError(f"collection {name!r} was deleted", param="name")
            if col.unsure:
                await asyncio.to_thread(self._reconcile, col)

            def locked() -> tuple[list, float | None, bool]:
                t = time.perf_counter()
                index = col.index
                with index.lock:
                    hits = [h for h in index.similar(qvec[0], req.k + 1) if h[0] != key][: req.k]
                    bar = index.nn_similarity_quantile(req.threshold_quantile) if req.threshold_quantile else None
                    current = {key: index.texts[index.row_of[key]]} if key in index else {}
                bar = req.threshold if bar is None else bar
                similar = bool(hits) and hits[0][2] >= bar
                self.observe("check", time.perf_counter() - t)
                accepted = req.force or not similar
                if accepted:
                    changed = [] if current.get(key) == point.text else [key]
                    self._apply(col, {key: point}, changed, np.asarray(dvec, np.float32).reshape(1, -1), current)
                return hits, bar, accepted

            hits, bar, accepted = await asyncio.to_thread(locked)
        best = hits[0][2] if hits else None
        return AcceptResponse(neighbors=[Neighbor(id=k, text=t, score=s) for k, t, s in hits],
                              max_similarity=best, is_similar=best is not None and best >= bar, threshold=bar,
                              accepted=accepted, truncated=bool(trunc[0]))

    async def delete_points(self, name: str, ids: list) -> list:
        for i, point_id in enumerate(ids):
            _check_id(point_id, f"ids[{i}]", f"ids.{i}")
        col = await self._get(name)
        keys = [to_key(i) for i in ids]
        async with col.write_lock:
            if col.unsure:
                await asyncio.to_thread(self._reconcile, col)
            try:
                await asyncio.to_thread(self.store.delete_points, name, keys)
            except ServiceUnavailableError:
                col.unsure.update(keys)
                raise

            def drop() -> None:
                with col.index.lock:
                    for k in keys:
                        if k in col.index:
                            col.index.remove(k)

            await asyncio.to_thread(drop)
        return ids

    def _reconcile(self, col: _Collection) -> None:
        """Make the index hold exactly what Qdrant holds for the keys of failed writes."""
        keys = list(col.unsure)
        held = self.store.retrieve(col.name, keys)  # a 503 here: they stay unsure, the write fails
        index = col.index
        fixed = 0
        with index.lock:
            for k in keys:
                got = held.get(k)
                if got is None:
                    if k in index:
                        index.remove(k)
                        fixed += 1
                    continue
                vec, payload = got
                text = str(payload.get(TEXT_KEY, ""))
                seq = int(payload.get(SEQ_KEY, index.next_seq))
                if k in index and index.texts[index.row_of[k]] == text and index.seq_of(k) == seq:
                    continue
                if k in index:
                    index.remove(k)
                index.add(k, vec, text, seq=seq)
                fixed += 1
        col.unsure.clear()
        log.info("collection %s: %d of %d points of failed writes reconciled with Qdrant", col.name, fixed,
                 len(keys))

    # ------------------------------------------------------------------ queries
    async def similar(self, name: str, text: str, k: int, threshold: float,
                      threshold_quantile: float | None = None) -> SimilarResponse:
        """Nearest stored points; ``is_similar`` against ``threshold`` or, when given, against the
        ``threshold_quantile`` of the collection's nearest-neighbour similarities (2+ points)."""
        col = await self._get(name)
        vec, _ = await self.encoder.encode([text], query=True)

        def run():
            with col.index.lock:
                hits = col.index.similar(vec[0], k)
                bar = col.index.nn_similarity_quantile(threshold_quantile) if threshold_quantile else None
                return hits, bar

        hits, bar = await asyncio.to_thread(run)
        bar = threshold if bar is None else bar
        best = hits[0][2] if hits else None
        return SimilarResponse(neighbors=[Neighbor(id=key, text=t, score=s) for key, t, s in hits],
                               max_similarity=best, is_similar=best is not None and best >= bar, threshold=bar)

    async def dense(self, name: str, k: int, knn: int) -> DenseResponse:
        if knn > self.knn_capacity:
            raise BadRequestError(f"knn={knn} exceeds the neighbours this controller keeps per point "
                                  f"({self.knn_capacity}); ask for knn <= {self.knn_capacity} or restart "
                                  "it with a larger --knn-capacity", param="knn")
        col = await self._get(name)

        def run():
            with col.index.lock:
                return col.index.dense(k, knn)

        hits = await asyncio.to_thread(run)
        return DenseResponse(items=[DenseItem(id=h.key, text=h.text, density=h.density) for h in hits])

    async def metrics(self, name: str, req: MetricsRequest) -> MetricsResponse:
        col = await self._get(name)
        basis = mean = None
        if req.pca_basis is not None:
            basis = _float_array(req.pca_basis, (diversity.HULL_DIMS, col.index.dim), "pca_basis",
                                 f"{diversity.HULL_DIMS} rows of {col.index.dim} numbers")
        if req.pca_mean is not None:
            mean = _float_array(req.pca_mean, (col.index.dim,), "pca_mean", f"{col.index.dim} numbers")
        for key in req.filter or {}:
            if not _PAYLOAD_KEY.fullmatch(key):
                raise BadRequestError(f"filter key {key!r} is not a payload key: use the plain keys the "
                                      "points were stored with (letters, digits, '_' and '-')", param="filter")

        def gather() -> tuple[np.ndarray, list[str]]:
            if req.filter:
                rows = list(self.store.scan(name, with_vectors=True, where=req.filter))
                vecs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, col.index.dim), np.float32)
                return vecs, [str(r[2].get(TEXT_KEY, "")) for r in rows]
            with col.index.lock:
                return col.index.vectors.copy(), list(col.index.texts)

        def run() -> diversity.DiversityMetrics:
            x, texts = gather()
            return diversity.compute(x, texts, pca_basis=basis, pca_mean=mean)

        m = await asyncio.to_thread(run)
        return MetricsResponse(**m.as_dict())

    async def embed(self, texts: list[str], query: bool) -> tuple[np.ndarray, list[bool]]:
        return await self.encoder.encode(texts, query=query)


_PAYLOAD_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
MAX_INT_ID = 2**64 - 1  # Qdrant's integer ids are unsigned 64-bit


def _check_id(point_id, where: str, param: str) -> None:
    if isinstance(point_id, int) and not 0 <= point_id <= MAX_INT_ID:
        raise BadRequestError(f"{where} = {point_id} is out of range: integer point ids are 0 .. 2**64 - 1 "
                              "(Qdrant's unsigned 64-bit ids), or use a UUID", param=param)


def _unstorable(value) -> str | None:
    """Why a payload value cannot be stored as it is, or None: Qdrant keeps payloads as JSON numbers
    (no NaN or Infinity) and integers of 64 bits (larger ones would come back as rounded floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN or Infinity: Qdrant stores payloads as JSON, which has no such numbers"
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value <= MAX_INT_ID:
        return f"the integer {value}, beyond 64 bits: Qdrant would keep it as a rounded float (send a string)"
    if isinstance(value, dict):
        return next((w for w in map(_unstorable, value.values()) if w), None)
    if isinstance(value, (list, tuple)):
        return next((w for w in map(_unstorable, value) if w), None)
    return None


def _float_array(values, shape: tuple[int, ...], param: str, expected: str) -> np.ndarray:
    """A request's nested number lists as an array of exactly ``shape``, or a 400 naming ``param``."""
    try:
        arr = np.asarray(values, np.float64)
    except ValueError:  # ragged rows
        arr = None
    if arr is None or arr.shape != shape or not np.isfinite(arr).all():
        raise BadRequestError(f"{param} must be {expected} (finite)", param=param)
    return arr
