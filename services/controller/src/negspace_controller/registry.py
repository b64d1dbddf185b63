"""The collection registry and its persistence: which collections this replica holds in memory (a
Qdrant collection + its density index), loading them (from the index log and snapshot, else a
rebuild from Qdrant), their snapshots and memory-mapped arrays, which replica owns each, and the
reconciliation of an index with what Qdrant holds after a write of unknown outcome.

Loads are serialised per collection (an asyncio lock); disk and Qdrant work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from negspace_contracts.controller import COLLECTION_NAME_PATTERN, CollectionInfo, controller_for
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError

from negspace_controller.ann import ApproxDensityIndex
from negspace_controller.embedding import Embedder
from negspace_controller.index import DensityIndex
from negspace_controller.journal import Journal, JournalCorrupt, covered_seqs, dangling_rows, replay, state_of
from negspace_controller.store import SEQ_KEY, TEXT_KEY, Store

log = logging.getLogger("negspace.controller")
_NAME = re.compile(COLLECTION_NAME_PATTERN)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequestError(f"invalid collection name {name!r}: use 1-128 letters, digits, '_' or '-', "
                              "starting with a letter or digit", param="name")
    return name


@dataclass
class Collection:
    name: str
    index: DensityIndex
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Keys whose last write to Qdrant failed with an unknown outcome (timeout, dropped connection,
    # 5xx mid-batch): Qdrant may or may not hold it. Reconciled from Qdrant before the next write.
    unsure: set[Hashable] = field(default_factory=set)


class Collections:
    def __init__(self, embedder: Embedder, store: Store, *, knn_capacity: int = 32,
                 snapshot_dir: str | Path | None = None, index_mode: str = "exact",
                 approx_candidates: int | None = None, index_mmap: bool | None = None,
                 replica: str | None = None, replicas: Sequence[str] = ()) -> None:
        self.embedder = embedder
        self.store = store
        # Which collections this replica serves: see ``owner``. No replicas: it serves them all.
        self.replica = replica
        self.replicas = list(replicas)
        if self.replicas and replica not in self.replicas:
            raise ValueError(f"replica {replica!r} is not one of the replicas {self.replicas}")
        if index_mode not in ("exact", "approximate"):
            raise ValueError(f"index_mode must be 'exact' or 'approximate', not {index_mode!r}")
        self.index_mode = index_mode
        self.approx_candidates = approx_candidates
        self.knn_capacity = knn_capacity
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        # memory-mapped vectors and lists (beside the index log): by default in approximate mode,
        # the one meant for collections too large to keep twice in memory
        self.index_mmap = (index_mode == "approximate") if index_mmap is None else index_mmap
        if self.index_mmap and self.snapshot_dir is not None:
            shutil.rmtree(self.snapshot_dir / "arrays", ignore_errors=True)  # no index of this process yet
        self.loaded: dict[str, Collection] = {}  # what this replica holds in memory, by name
        self._loading: dict[str, asyncio.Lock] = {}
        self.from_snapshot: set[str] = set()  # collections whose lists came from a snapshot

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

    def check_owner(self, name: str) -> None:
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
    async def get(self, name: str) -> Collection:
        check_name(name)
        col = self.loaded.get(name)
        if col is not None:
            return col
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            col = self.loaded.get(name)
            if col is None:
                if not await asyncio.to_thread(self.store.exists, name):
                    raise NotFoundError(f"collection {name!r} does not exist; create it with PUT "
                                        f"/collections/{name}", param="name")
                await asyncio.to_thread(self.check_owner, name)
                col = await asyncio.to_thread(self._load, name)
                self.loaded[name] = col
        return col

    def _load(self, name: str) -> Collection:
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
        return Collection(name, index)

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
        for name, col in list(self.loaded.items()):
            j = col.index.journal
            if j is None:
                continue
            with col.index.lock:
                j.compact(state_of(col.index), background=False)
                j.close()
            log.info("collection %s: snapshot of %d points written", name, len(col.index))

    def _drop_snapshot(self, name: str) -> None:
        col = self.loaded.get(name)
        j = col.index.journal if col is not None else self._journal(name)
        if j is not None:
            j.drop()
        self._remove_arrays(name)

    def info_of(self, col: Collection) -> CollectionInfo:
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
                self.loaded[name] = Collection(name, index)
                created = True
        return self.info_of(await self.get(name)), created

    async def info(self, name: str) -> CollectionInfo:
        return self.info_of(await self.get(name))

    async def delete(self, name: str) -> None:
        col = await self.get(name)
        async with col.write_lock:
            try:
                await asyncio.to_thread(self.store.drop, name)
            except ServiceUnavailableError:
                # it may have been dropped anyway: forget the in-memory copy, the next request
                # asks Qdrant again (404, or a reload of what it still holds)
                self.loaded.pop(name, None)
                raise
            self._drop_snapshot(name)
            self.loaded.pop(name, None)

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
                await self.get(name)
            except Exception as exc:  # one bad collection must not stop the others
                log.warning("collection %s not loaded: %s", name, exc)
        if others:
            log.info("start-up: %d collections belong to other replicas and are not loaded here (%s%s)",
                     len(others), ", ".join(others[:5]), ", ..." if len(others) > 5 else "")

    def release(self, name: str) -> None:
        """Forget this replica's copy of a collection it does not own: the in-memory index and its
        index log and arrays (Qdrant keeps the points; the owner's copy is the one kept current)."""
        col = self.loaded.pop(name, None)
        j = col.index.journal if col is not None else self._journal(name)
        if j is not None and (col is not None or j.has_files()):
            log.info("collection %s: dropping this replica's copy (it belongs to another replica)", name)
            j.drop()
        self._remove_arrays(name)

    def reconcile(self, col: Collection) -> None:
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
