"""Durable neighbour lists: a snapshot plus an append-only log of every change since it.

Why: the lists are O(n^2 d) to rebuild from the vectors (469 s at 100k, hours at 10^6), so they
are made durable as they change. Every insert and delete the index applies is appended here in
the index's own terms, by insertion sequence (never by row, which moves):

- ``ADD``: the new point's sequence, its own list (neighbour sequences + similarities), and every
  other point whose list took it (their sequences + the similarity). Replaying it merges the new
  point into those lists exactly as the live insert did (same stable merge), so replay is O(K)
  per record, not O(n d).
- ``REMOVE``: the deleted sequence and the recomputed lists of the points that held it.

Files per collection, in the index folder: ``<name>.snap-<g>.npz`` (every list at generation
``g``, by sequence) and ``<name>.log-<g>``, ``<name>.log-<g+1>``, ... (records since). A record is
``[length u32][crc32 u32][body]``; a torn tail (a kill mid-append) fails its length or CRC and
ends the replay there. Compaction (when the log outgrows the snapshot, and at shutdown) copies the
lists under the index lock, switches appends to the next generation at once, writes the new
snapshot in the background, then deletes the older files: a kill at any point leaves a snapshot
plus the logs that follow it. Appends are ``write()`` calls on an unbuffered file: a SIGKILL of
the process loses nothing written; an OS crash can lose what the page cache held (``fsync`` per
insert would cost more than the insert), and recovery reconciles against Qdrant either way.

Recovery (``recover``): read the snapshot and logs, load from Qdrant only the points they cover,
apply the snapshot, replay the log; points Qdrant holds that the log never saw (killed between
Qdrant's write and the append) are inserted normally; points the log has but Qdrant lost have
their references recomputed. The answer is the one a from-scratch rebuild gives.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger("negspace.controller")

ADD, REMOVE = 1, 2
_HEAD = struct.Struct("<II")  # length of body, crc32 of body
_ADD = struct.Struct("<BqHI")  # type, seq, own list length m, hits h
_REM = struct.Struct("<BqI")   # type, seq, recomputed rows r


class JournalCorrupt(Exception):
    """The snapshot cannot be used (another capacity, unreadable): recovery rebuilds instead."""


def _files(folder: Path, stem: str, kind: str) -> list[tuple[int, Path]]:
    pat = re.compile(re.escape(stem) + rf"\.{kind}-(\d+)(\.npz)?$")
    out = []
    for p in folder.glob(f"{stem}.{kind}-*"):
        m = pat.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


class Journal:
    """The log of one collection's index. Not thread-safe by itself: the index calls it under its lock."""

    def __init__(self, folder: str | Path, stem: str, *, compact_ratio: float = 1.0,
                 min_compact_bytes: int = 1 << 20) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.compact_ratio = compact_ratio
        self.min_compact_bytes = min_compact_bytes
        self.gen = 0
        self._fh = None
        self.log_bytes = 0
        self.records = 0
        self.compactions = 0
        self._compacting: threading.Thread | None = None
        # called with a path during compaction, under the index lock, for state beside the lists
        # (the approximate index's HNSW graph): ``graph_path()`` names the newest one
        self.save_extra: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ appends
    def _open(self, gen: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self.gen = gen
        self._fh = open(self.folder / f"{self.stem}.log-{gen}", "ab", buffering=0)  # noqa: SIM115
        self.log_bytes = self._fh.tell()

    def _append(self, body: bytes) -> None:
        if self._fh is None:
            self._open(self.gen)
        rec = _HEAD.pack(len(body), zlib.crc32(body)) + body
        self._fh.write(rec)
        self.log_bytes += len(rec)
        self.records += 1

    def add(self, seq: int, own_seqs: np.ndarray, own_sims: np.ndarray, hit_seqs: np.ndarray,
            hit_sims: np.ndarray) -> None:
        self._append(_ADD.pack(ADD, seq, own_seqs.size, hit_seqs.size)
                     + own_seqs.astype("<i8").tobytes() + own_sims.astype("<f4").tobytes()
                     + hit_seqs.astype("<i8").tobytes() + hit_sims.astype("<f4").tobytes())

    def remove(self, seq: int, row_seqs: np.ndarray, counts: np.ndarray, nseqs: np.ndarray,
               nsims: np.ndarray) -> None:
        """``nseqs``/``nsims``: (r x K) recomputed lists (entries past ``counts`` ignored)."""
        self._append(_REM.pack(REMOVE, seq, row_seqs.size) + row_seqs.astype("<i8").tobytes()
                     + counts.astype("<i4").tobytes() + nseqs.astype("<i8").tobytes()
                     + nsims.astype("<f4").tobytes())

    def close(self) -> None:
        self.wait()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    # ------------------------------------------------------------------ compaction
    def wants_compaction(self, n: int, capacity: int) -> bool:
        snapshot_bytes = n * capacity * 12
        return (self._compacting is None or not self._compacting.is_alive()) and \
            self.log_bytes > max(self.min_compact_bytes, self.compact_ratio * snapshot_bytes)

    def compact(self, state: dict[str, np.ndarray], background: bool = True) -> None:
        """``state`` (a copy taken under the index lock): seqs, nseqs, nsims, ncount, capacity.
        Appends go to the next generation from now on; the snapshot is written after."""
        self.wait()
        new_gen = self.gen + 1
        if self.save_extra is not None:
            self.save_extra(str(self.folder / f"{self.stem}.graph-{new_gen}"))
        self._open(new_gen)

        def write() -> None:
            path = self.folder / f"{self.stem}.snap-{new_gen}.npz"
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
            np.savez(tmp, **state)
            os.replace(tmp, path)
            for g, p in self._all_files():
                if g < new_gen:
                    p.unlink(missing_ok=True)
            self.compactions += 1
            log.info("index %s: compacted %d points into generation %d", self.stem, state["seqs"].size, new_gen)

        if background:
            self._compacting = threading.Thread(target=write, name=f"compact-{self.stem}", daemon=True)
            self._compacting.start()
        else:
            write()

    def wait(self) -> None:
        t = self._compacting
        if t is not None:
            t.join()
            self._compacting = None

    def drop(self) -> None:
        """Forget everything (the collection was deleted or recreated)."""
        self.close()
        for _, p in self._all_files():
            p.unlink(missing_ok=True)
        self.gen = 0
        self.log_bytes = 0

    def has_files(self) -> bool:
        """Whether anything of this collection's log is on disk."""
        return bool(self._all_files())

    def _all_files(self) -> list[tuple[int, Path]]:
        return [f for kind in ("snap", "log", "graph") for f in _files(self.folder, self.stem, kind)]

    def graph_path(self) -> str | None:
        """The extra state saved with the newest snapshot, if any (after ``read``)."""
        snaps = _files(self.folder, self.stem, "snap")
        if not snaps:
            return None
        path = self.folder / f"{self.stem}.graph-{snaps[-1][0]}"
        return str(path) if path.is_file() else None

    # ------------------------------------------------------------------ reading back
    def read(self, capacity: int) -> tuple[dict | None, list[tuple]]:
        """(snapshot arrays or None, records of every log from the snapshot's generation on).
        Raises JournalCorrupt when the snapshot is unusable."""
        snaps = _files(self.folder, self.stem, "snap")
        snap = None
        base = 0
        if snaps:
            base, path = snaps[-1]
            try:
                with np.load(path, allow_pickle=False) as z:
                    snap = {k: z[k] for k in ("seqs", "nseqs", "nsims", "ncount", "capacity")}
            except (OSError, ValueError, KeyError) as exc:
                raise JournalCorrupt(f"snapshot {path.name} unreadable: {exc}") from exc
            if int(snap["capacity"]) != capacity:
                raise JournalCorrupt(f"snapshot {path.name} has capacity {int(snap['capacity'])}, not {capacity}")
        records: list[tuple] = []
        last = base
        for g, path in _files(self.folder, self.stem, "log"):
            if g < base:
                continue
            records += _parse(path.read_bytes(), capacity)
            last = g
        self.gen = last
        return snap, records


def _parse(data: bytes, K: int) -> list[tuple]:
    out: list[tuple] = []
    pos = 0
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        body = data[pos + _HEAD.size: pos + _HEAD.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            log.warning("index log: a torn record at byte %d (a kill mid-append); replay stops there", pos)
            break
        pos += _HEAD.size + length
        kind = body[0]
        if kind == ADD:
            _, seq, m, h = _ADD.unpack_from(body)
            o = _ADD.size
            own_s = np.frombuffer(body, "<i8", m, o)
            o += 8 * m
            own_v = np.frombuffer(body, "<f4", m, o)
            o += 4 * m
            hit_s = np.frombuffer(body, "<i8", h, o)
            o += 8 * h
            hit_v = np.frombuffer(body, "<f4", h, o)
            out.append((ADD, seq, own_s, own_v, hit_s, hit_v))
        elif kind == REMOVE:
            _, seq, r = _REM.unpack_from(body)
            o = _REM.size
            rows = np.frombuffer(body, "<i8", r, o)
            o += 8 * r
            counts = np.frombuffer(body, "<i4", r, o)
            o += 4 * r
            nseqs = np.frombuffer(body, "<i8", r * K, o).reshape(r, K)
            o += 8 * r * K
            nsims = np.frombuffer(body, "<f4", r * K, o).reshape(r, K)
            out.append((REMOVE, seq, rows, counts, nseqs, nsims))
        else:
            log.warning("index log: unknown record type %d at byte %d; replay stops there", kind, pos)
            break
    return out


def covered_seqs(snap: dict | None, records: list[tuple]) -> set[int]:
    """The sequences whose lists the snapshot + log describe at the end of the replay."""
    have = set(snap["seqs"].tolist()) if snap is not None else set()
    for rec in records:
        if rec[0] == ADD:
            have.add(rec[1])
        else:
            have.discard(rec[1])
    return have


def replay(index, snap: dict | None, records: list[tuple], progress: Callable[[int, int], None] | None = None) -> int:
    """Apply the snapshot and the records to an index loaded (``compute=False``) with exactly the
    covered points in sequence order. References to sequences the index lacks end up as row -1
    with their similarity; ``dangling_rows`` finds them. Returns the records applied."""
    n = index.n
    seqs = index._seq[:n]

    def rows_of(q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, np.int64)
        if n == 0:
            return np.full(q.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(seqs, q), 0, n - 1)
        return np.where(seqs[pos] == q, pos, -1)

    if snap is not None and snap["seqs"].size:
        r = rows_of(snap["seqs"])
        ok = r >= 0
        nseqs = snap["nseqs"][ok]
        nrow = np.where(nseqs >= 0, rows_of(nseqs), -1)
        index._nrow[r[ok]] = nrow
        index._nsim[r[ok]] = snap["nsims"][ok]
        index._ncount[r[ok]] = snap["ncount"][ok]
    total = len(records)
    for i, rec in enumerate(records):
        if rec[0] == ADD:
            _, seq, own_s, own_v, hit_s, hit_v = rec
            r = int(rows_of(np.array([seq]))[0])
            if r >= 0:
                m = own_s.size
                index._nsim[r] = -np.inf
                index._nrow[r] = -1
                index._nsim[r, :m] = own_v
                index._nrow[r, :m] = rows_of(own_s)
                index._ncount[r] = m
            if hit_s.size:
                hr = rows_of(hit_s)
                ok = hr >= 0
                if ok.any():
                    index._merge(hr[ok], np.asarray(hit_v[ok]), r)
        else:
            _, seq, rows, counts, nseqs, nsims = rec
            rr = rows_of(rows)
            ok = rr >= 0
            if ok.any():
                ns = nseqs[ok]
                index._nrow[rr[ok]] = np.where(ns >= 0, rows_of(ns), -1)
                index._nsim[rr[ok]] = nsims[ok]
                index._ncount[rr[ok]] = counts[ok]
        if progress and (i + 1) % 65536 == 0:
            progress(i + 1, total)
    index._heaps.clear()
    return total


def dangling_rows(index) -> np.ndarray:
    """Rows whose kept list names a point the index does not hold (row -1 with a similarity)."""
    n, K = index.n, index.capacity
    within = np.arange(K)[None, :] < index._ncount[:n, None]
    return np.flatnonzero(((index._nrow[:n] < 0) & within).any(axis=1))


def state_of(index) -> dict[str, np.ndarray]:
    """The arrays a snapshot holds, by sequence (rows sorted by sequence)."""
    n = index.n
    order = np.argsort(index._seq[:n], kind="stable")
    nrow = index._nrow[:n][order]
    return {"seqs": index._seq[:n][order].copy(),
            "nseqs": np.where(nrow >= 0, index._seq[np.clip(nrow, 0, None)], -1),
            "nsims": index._nsim[:n][order].copy(), "ncount": index._ncount[:n][order].copy(),
            "capacity": np.array(index.capacity)}
