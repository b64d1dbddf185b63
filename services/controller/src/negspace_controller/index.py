"""Exact, incrementally maintained k-nearest-neighbour densities over unit vectors.

Definition (the one the API documents and the tests check against brute force):
    sim(p, q)      = cosine similarity = dot product of the L2-normalised vectors
    density(p)     = 1 / max(mean_{q in N_m(p)} (1 - sim(p, q)), DISTANCE_FLOOR)
    N_m(p)         = the m = min(knn, n - 1) most similar other points; a lone point has density 0.
``dense(k, knn)`` returns the k points of highest density, densest first (ties: earlier insert first).

How it stays exact and cheap. Every point keeps the ``capacity`` (K) largest similarities to
other points, sorted. kNN is not symmetric: a new point p can enter the list of a point q that
is not among p's own neighbours, so one query for p's neighbours is not enough. Instead an
insert computes sim(p, all) with ONE matrix-vector product over the in-memory matrix (O(n d)
NumPy, ~1-3 ms at n = 100k, d = 384); that gives p's list and every q whose K-th similarity p
beats (a full list also takes p). A delete recomputes the lists that contained the deleted
point (one small matrix product). Densities for each ``knn`` asked for are kept in a lazy
max-heap, so ``dense`` pops k valid entries: O(k log n) amortised.
Only the density value matters for ties at a list's boundary: which of two equally similar
points a list keeps never changes the similarities it holds.
"""

from __future__ import annotations

import heapq
import shutil
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DISTANCE_FLOOR = 1e-6  # duplicates have distance 0: density is capped at 1e6 instead of infinite
MAX_TRACKED_KNN = 8    # distinct knn values with a maintained heap (least recently used dropped)


def topk_rows(s: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of the m largest entries of each row, sorted descending.

    torch.topk when torch is importable (it is wherever sentence-transformers is): on a wide
    block it is ~20x faster than np.argpartition. Ties may come in either order; only the
    values enter a density.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - numpy fallback
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
        vals = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(top, order, axis=1)
    vals, top = torch.topk(torch.from_numpy(s), m, dim=1, largest=True, sorted=True)
    return vals.numpy(), top.numpy().astype(np.int64)


def density_from_sims(sims: np.ndarray) -> np.ndarray:
    """Densities from rows of the m largest similarities (m >= 1): 1 / max(mean distance, floor)."""
    dist = np.clip(1.0 - sims.astype(np.float64), 0.0, None).mean(axis=-1)
    return 1.0 / np.maximum(dist, DISTANCE_FLOOR)


@dataclass
class DenseHit:
    key: Hashable
    text: str
    density: float


class _Heap:
    """Max-heap of (density, seq) for one knn; stale entries are skipped when popped."""

    def __init__(self, knn: int) -> None:
        self.knn = knn
        self.entries: list[tuple[float, int, int]] = []  # (-density, seq, version)
        self.density: dict[int, tuple[float, int]] = {}  # seq -> (density, version)


class DensityIndex:
    """In-memory exact index for one collection. Not thread-safe: callers hold a lock."""

    def __init__(self, dim: int, capacity: int = 32, initial_rows: int = 1024, *,
                 storage_dir: str | Path | None = None) -> None:
        """``storage_dir``: keep the vectors and the neighbour lists (all but ~24 bytes a point of
        the index's arrays) in memory-mapped files there instead of anonymous memory, so the kernel
        can page them out under memory pressure (they are rebuilt at every load: a cache, not a
        store; the folder is emptied first). None: in memory."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.dim = dim
        self.capacity = capacity
        self.n = 0
        rows = max(initial_rows, 1)
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        if self.storage_dir is not None:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            self.storage_dir.mkdir(parents=True)
        self._vec = self._array("vectors", (rows, dim), np.float32, 0)
        self._nsim = self._array("nsim", (rows, capacity), np.float32, -np.inf)  # each row sorted descending
        self._nrow = self._array("nrow", (rows, capacity), np.int64, -1)
        self._ncount = np.zeros(rows, np.int64)
        self._seq = np.zeros(rows, np.int64)
        self._version = np.zeros(rows, np.int64)
        self.keys: list[Hashable] = []
        self.texts: list[str] = []
        self.row_of: dict[Hashable, int] = {}
        self._seq_row: dict[int, int] = {}
        self.next_seq = 0
        self._heaps: dict[int, _Heap] = {}
        self.lock = threading.RLock()
        self.journal = None  # a negspace_controller.journal.Journal: every list change is appended there

    def _journal_done(self) -> None:
        j = self.journal
        if j is not None and j.wants_compaction(self.n, self.capacity):
            from negspace_controller.journal import state_of

            j.compact(state_of(self))

    # ---------------------------------------------------------------- storage helpers
    # every per-row array: (attribute, file name when memory-mapped or None: always in memory, fill)
    _ARRAYS = (("_vec", "vectors", 0), ("_nsim", "nsim", -np.inf), ("_nrow", "nrow", -1),
               ("_ncount", None, 0), ("_seq", None, 0), ("_version", None, 0))

    def _array(self, name: str | None, shape: tuple[int, ...], dtype, fill,
               old: np.ndarray | None = None) -> np.ndarray:
        """A ``shape`` array filled with ``fill`` after ``old``'s rows: in memory, or (a ``name`` and a
        ``storage_dir``) a memory-mapped file that grows in place (the file is extended, nothing is
        copied)."""
        if name is None or self.storage_dir is None:
            a = np.full(shape, fill, dtype)
            if old is not None:
                a[: old.shape[0]] = old
            return a
        path = self.storage_dir / f"{name}.bin"
        with path.open("r+b" if old is not None else "w+b") as f:
            f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        a = np.memmap(path, dtype=dtype, mode="r+", shape=shape)
        start = 0 if old is None else old.shape[0]
        if fill != 0:  # a new file (or its extension) reads as zeros
            a[start:] = fill
        return a

    def _grow(self, need: int) -> None:
        rows = self._vec.shape[0]
        if need <= rows:
            return
        new = max(need, rows * 2)

        for attr, name, fill in self._ARRAYS:
            a = getattr(self, attr)
            setattr(self, attr, self._array(name, (new, *a.shape[1:]), a.dtype, fill, old=a))

    @property
    def vectors(self) -> np.ndarray:
        return self._vec[: self.n]

    def __len__(self) -> int:
        return self.n

    def __contains__(self, key: Hashable) -> bool:
        return key in self.row_of

    def seq_of(self, key: Hashable) -> int:
        return int(self._seq[self.row_of[key]])

    def neighbours(self, key: Hashable) -> list[tuple[Hashable, float]]:
        """The kept neighbour list of one point: (key, similarity), most similar first."""
        r = self.row_of[key]
        c = int(self._ncount[r])
        return [(self.keys[int(j)], float(s)) for j, s in zip(self._nrow[r, :c], self._nsim[r, :c], strict=True)]

    # ---------------------------------------------------------------- writes
    def _candidates(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, similarities to ``v``) of every point whose list ``v`` might enter: all of them,
        by one matrix-vector product (the approximate index narrows this to HNSW candidates)."""
        n = self.n
        return np.arange(n), self._vec[:n] @ v

    def add(self, key: Hashable, vector: np.ndarray, text: str, seq: int | None = None) -> None:
        """Insert one new point (the caller removes an existing key first)."""
        if key in self.row_of:
            raise KeyError(f"{key!r} is already indexed")
        v = np.asarray(vector, np.float32).reshape(self.dim)
        n, K = self.n, self.capacity
        self._grow(n + 1)
        r = n
        seq = self.next_seq if seq is None else int(seq)
        hit = top = np.zeros(0, np.int64)
        hs = ts = np.zeros(0, np.float32)
        if n:
            cand, s = self._candidates(v)  # rows that may take p, and their similarity to it
            m = min(K, cand.size)
            pos = np.argpartition(-s, m - 1)[:m] if m < cand.size else np.arange(cand.size)
            pos = pos[np.argsort(-s[pos], kind="stable")]
            top, ts = cand[pos], s[pos]
            self._nsim[r, :m] = ts
            self._nrow[r, :m] = top
            self._ncount[r] = m
            # Every q whose list is not full, or whose K-th similarity p beats, takes p.
            counts = self._ncount[cand]
            worst = self._nsim[cand, np.minimum(counts, K) - 1]
            hp = np.flatnonzero((counts < K) | (s > worst))
            hit, hs = cand[hp], s[hp]
            if hit.size:
                self._merge(hit, hs, r)
            changed = np.append(hit, r)
        else:
            self._ncount[r] = 0
            changed = np.array([r])
        self._vec[r] = v
        if self.journal is not None:
            self.journal.add(seq, self._seq[top], ts, self._seq[hit], hs)
        self.next_seq = max(self.next_seq, seq + 1)
        self._seq[r] = seq
        self._version[r] = 0
        self.keys.append(key)
        self.texts.append(text)
        self.row_of[key] = r
        self._seq_row[seq] = r
        self.n = n + 1
        self._touch(changed, n_before=n)
        self._journal_done()

    def _merge(self, rows: np.ndarray, sims: np.ndarray, new_row: int) -> None:
        K = self.capacity
        cs = np.concatenate([self._nsim[rows], sims[:, None].astype(np.float32)], axis=1)
        cr = np.concatenate([self._nrow[rows], np.full((rows.size, 1), new_row, np.int64)], axis=1)
        order = np.argsort(-cs, axis=1, kind="stable")[:, :K]
        self._nsim[rows] = np.take_along_axis(cs, order, axis=1)
        self._nrow[rows] = np.take_along_axis(cr, order, axis=1)
        self._ncount[rows] = np.minimum(self._ncount[rows] + 1, K)

    def remove(self, key: Hashable) -> None:
        r = self.row_of.pop(key)
        n, _K = self.n, self.capacity
        last = n - 1
        seq = int(self._seq[r])
        del self._seq_row[seq]
        for h in self._heaps.values():
            h.density.pop(seq, None)
        # Lists that held r lose it and are recomputed below (exact top-K among the rest).
        held = np.flatnonzero((self._nrow[:n] == r).any(axis=1))
        # Move the last row into r so the matrix stays dense.
        if r != last:
            self._vec[r] = self._vec[last]
            self._nsim[r] = self._nsim[last]
            self._nrow[r] = self._nrow[last]
            self._ncount[r] = self._ncount[last]
            self._seq[r] = self._seq[last]
            self._version[r] = self._version[last]
            moved_key = self.keys[last]
            self.keys[r] = moved_key
            self.texts[r] = self.texts[last]
            self.row_of[moved_key] = r
            self._seq_row[int(self._seq[r])] = r
            self._nrow[: n][self._nrow[:n] == last] = r
            held = np.where(held == last, r, held)
        self.keys.pop()
        self.texts.pop()
        self._nsim[last] = -np.inf
        self._nrow[last] = -1
        self._ncount[last] = 0
        self.n = n - 1
        held = np.unique(held[held < self.n])
        if held.size:
            self._recompute(held)
        if self.journal is not None:
            nrow = self._nrow[held]
            self.journal.remove(seq, self._seq[held], self._ncount[held],
                                np.where(nrow >= 0, self._seq[np.clip(nrow, 0, None)], -1), self._nsim[held])
        self._touch(held, n_before=n)
        self._journal_done()

    def _recompute(self, rows: np.ndarray, block: int = 256) -> None:
        """Recompute the lists of ``rows`` from scratch against all points."""
        n, K = self.n, self.capacity
        m = min(K, n - 1)
        for start in range(0, rows.size, block):
            rs = rows[start:start + block]
            s = self._vec[rs] @ self._vec[:n].T
            s[np.arange(rs.size), rs] = -np.inf
            self._nsim[rs] = -np.inf
            self._nrow[rs] = -1
            self._ncount[rs] = max(m, 0)
            if m <= 0:
                continue
            vals, top = topk_rows(s, m)
            self._nsim[rs, :m] = vals
            self._nrow[rs, :m] = top

    def rebuild(self, block: int = 1024, progress=None) -> None:
        """Recompute every list from the stored vectors: O(n^2 d) (start-up without a snapshot)."""
        n = self.n
        for start in range(0, n, block):
            self._recompute(np.arange(start, min(n, start + block)), block=block)
            if progress:
                progress(min(n, start + block), n)
        self._heaps.clear()

    def load(self, keys: Sequence[Hashable], vectors: np.ndarray, texts: Sequence[str],
             seqs: Sequence[int], progress=None, compute: bool = True) -> None:
        """Fill an empty index in one go (rows ordered by seq), then compute all lists
        (``compute=False``: leave them for ``apply_snapshot`` or a later ``rebuild``)."""
        if self.n:
            raise RuntimeError("load() needs an empty index")
        order = np.argsort(np.asarray(seqs, np.int64), kind="stable")
        n = len(keys)
        self._grow(n)
        vec = np.asarray(vectors, np.float32)
        self._vec[:n] = vec[order]
        self._seq[:n] = np.asarray(seqs, np.int64)[order]
        self.keys = [keys[i] for i in order]
        self.texts = [texts[i] for i in order]
        self.row_of = {k: i for i, k in enumerate(self.keys)}
        self._seq_row = {int(s): i for i, s in enumerate(self._seq[:n])}
        self.next_seq = int(self._seq[:n].max()) + 1 if n else 0
        self.n = n
        self._heaps.clear()
        if compute:
            self.rebuild(progress=progress)

    # ---------------------------------------------------------------- densities
    def _densities(self, rows: np.ndarray, knn: int) -> np.ndarray:
        m = min(knn, self.capacity, self.n - 1)
        if m <= 0:
            return np.zeros(rows.size)
        return density_from_sims(self._nsim[rows, :m])

    def _touch(self, rows: np.ndarray, n_before: int) -> None:
        # When n - 1 crosses a knn, every density with that knn changes: rebuild those heaps.
        for knn in list(self._heaps):
            if min(knn, n_before - 1) != min(knn, self.n - 1):
                del self._heaps[knn]
        if not self._heaps or rows.size == 0:
            return
        rows = rows[rows < self.n]
        self._version[rows] += 1
        for h in list(self._heaps.values()):
            dens = self._densities(rows, h.knn)
            for r, d in zip(rows.tolist(), dens.tolist(), strict=True):
                seq, ver = int(self._seq[r]), int(self._version[r])
                h.density[seq] = (d, ver)
                heapq.heappush(h.entries, (-d, seq, ver))
            if len(h.entries) > 4 * self.n + 1024:
                self._heaps.pop(h.knn)  # compacted on next use

    def _heap(self, knn: int) -> _Heap:
        h = self._heaps.pop(knn, None)
        if h is None:
            h = _Heap(knn)
            rows = np.arange(self.n)
            dens = self._densities(rows, knn)
            seqs = self._seq[: self.n].tolist()
            vers = self._version[: self.n].tolist()
            h.entries = [(-d, s, v) for d, s, v in zip(dens.tolist(), seqs, vers, strict=True)]
            heapq.heapify(h.entries)
            h.density = {s: (d, v) for d, s, v in zip(dens.tolist(), seqs, vers, strict=True)}
            if len(self._heaps) >= MAX_TRACKED_KNN:
                self._heaps.pop(next(iter(self._heaps)))
        self._heaps[knn] = h  # most recently used last
        return h

    def dense(self, k: int, knn: int) -> list[DenseHit]:
        """The k densest points, densest first; knn must be <= capacity."""
        if knn > self.capacity:
            raise ValueError(f"knn={knn} exceeds the maintained neighbour capacity {self.capacity}")
        if self.n == 0:
            return []
        h = self._heap(knn)
        out: list[tuple[float, int, int]] = []
        while h.entries and len(out) < min(k, self.n):
            neg, seq, ver = heapq.heappop(h.entries)
            cur = h.density.get(seq)
            if cur is None or cur[1] != ver:
                continue  # stale
            out.append((neg, seq, ver))
        for e in out:
            heapq.heappush(h.entries, e)
        hits = []
        for neg, seq, _ in out:
            r = self._seq_row[seq]
            hits.append(DenseHit(self.keys[r], self.texts[r], -neg))
        return hits

    def dense_bruteforce(self, k: int, knn: int, block: int = 2048) -> list[DenseHit]:
        """The same answer from an n x n similarity matrix: O(n^2 d). For benchmarks and tests."""
        n = self.n
        if n == 0:
            return []
        m = min(knn, n - 1)
        X = self._vec[:n]
        dens = np.zeros(n)
        if m > 0:  # the n x n matrix, a block of rows at a time so large n fits in memory
            for a in range(0, n, block):
                S = X[a:a + block] @ X.T
                S[np.arange(S.shape[0]), np.arange(a, a + S.shape[0])] = -np.inf
                top = -np.partition(-S, m - 1, axis=1)[:, :m]
                dens[a:a + block] = density_from_sims(top)
        order = np.lexsort((self._seq[:n], -dens))[:k]
        return [DenseHit(self.keys[r], self.texts[r], float(dens[r])) for r in order]

    # ---------------------------------------------------------------- queries
    def nn_similarity_quantile(self, q: float) -> float | None:
        """The ``q``-quantile of every point's similarity to its nearest other point (O(n) from the
        kept neighbour lists); None with fewer than 2 points."""
        n = self.n
        has = self._ncount[:n] > 0
        if n < 2 or not has.any():
            return None
        return float(np.quantile(self._nsim[:n, 0][has], q))

    def similar(self, vector: np.ndarray, k: int) -> list[tuple[Hashable, str, float]]:
        """Exact top-k by cosine similarity (O(n d))."""
        n = self.n
        if n == 0:
            return []
        s = self._vec[:n] @ np.asarray(vector, np.float32).reshape(self.dim)
        m = min(k, n)
        top = np.argpartition(-s, m - 1)[:m] if m < n else np.arange(n)
        top = top[np.argsort(-s[top], kind="stable")]
        return [(self.keys[r], self.texts[r], float(s[r])) for r in top]
