"""The write path: upserts, accepts (check + insert, atomic per collection) and deletes.

Writes to one collection are serialised (its asyncio lock); embedding happens before the lock,
batched with concurrent calls; Qdrant (the system of record) is written first, then the index.
A write whose outcome Qdrant leaves unknown marks its keys for reconciliation before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Hashable

import numpy as np
from negspace_contracts.controller import (
    AcceptRequest,
    AcceptResponse,
    Neighbor,
    PointIn,
    UpsertPointsResponse,
)
from negspace_contracts.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from negspace_controller.batching import BatchingEncoder
from negspace_controller.registry import Collection, Collections
from negspace_controller.store import RESERVED_KEYS, SEQ_KEY, TEXT_KEY, to_key


class Writes:
    def __init__(self, collections: Collections, encoder: BatchingEncoder,
                 observe: Callable[[str, float], None]) -> None:
        self.collections = collections
        self.store = collections.store
        self.embedder = collections.embedder
        self.encoder = encoder
        self.observe = observe

    @contextlib.asynccontextmanager
    async def _writing(self, name: str, col: Collection):
        """The collection's write lock (the wait observed as lock_wait), once it is known to be still
        there and its index agrees with Qdrant on the keys of earlier failed writes."""
        waited = time.perf_counter()
        async with col.write_lock:
            self.observe("lock_wait", time.perf_counter() - waited)
            if self.collections.loaded.get(name) is not col:
                raise NotFoundError(f"collection {name!r} was deleted", param="name")
            if col.unsure:
                await asyncio.to_thread(self.collections.reconcile, col)
            yield

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
        col = await self.collections.get(name)
        last: dict[Hashable, PointIn] = {}
        for p in points:  # a repeated id in one request: the last one wins
            last.pop(to_key(p.id), None)
            last[to_key(p.id)] = p
        index = col.index
        with index.lock:  # a first look without the write lock: embed outside it, batched with others
            stale = [p.text for k, p in last.items() if k not in index or index.texts[index.row_of[k]] != p.text]
        if stale:
            await self.encoder.encode(stale)
        async with self._writing(name, col):
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

    def _apply(self, col: Collection, last: dict, changed: list, vecs: np.ndarray, current: dict) -> None:
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
        col = await self.collections.get(name)
        key = to_key(point.id)
        qvec, trunc = await self.encoder.encode([point.text], query=True)
        dvec = qvec if not self.embedder.query_instruction else (await self.encoder.encode([point.text]))[0]
        async with self._writing(name, col):

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
        col = await self.collections.get(name)
        keys = [to_key(i) for i in ids]
        async with col.write_lock:
            if col.unsure:
                await asyncio.to_thread(self.collections.reconcile, col)
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
