"""Approximate density index: the exact index's lists and heaps, with HNSW (usearch) candidates.

The exact index pays one O(n d) scan per insert (every list p might enter) and O(n^2 d) for a
rebuild; past a few hundred thousand points that is more than an insert may cost. Here an
insert asks an HNSW graph (usearch, inner product on the unit vectors) for the ``candidates``
(C, default 4K) nearest points, scores them exactly, and treats only them as the points whose
lists may take p; p's own list is its K best among them. A list misses p only when p is not
among the C approximate neighbours of a point whose K-th similarity it beats. Everything else
(sorted lists, lazy heaps, ``dense``, the durable log) is the exact index's code, so the
difference is measured by one number: the overlap of ``dense`` selections with the exact index
(``make bench-controller`` records it at 10^5). HNSW keys are insertion sequences (rows move
on delete); the graph itself is rebuilt from the vectors on load (``usearch`` adds in parallel).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from negspace_controller.index import DensityIndex, topk_rows


class ApproxDensityIndex(DensityIndex):
    def __init__(self, dim: int, capacity: int = 32, initial_rows: int = 1024, *, candidates: int | None = None,
                 connectivity: int = 16, expansion_add: int = 64, expansion_search: int | None = None,
                 storage_dir=None) -> None:
        super().__init__(dim, capacity, initial_rows, storage_dir=storage_dir)
        from usearch.index import Index

        self.C = int(candidates or 4 * capacity)
        self.ann = Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity,
                         expansion_add=expansion_add, expansion_search=expansion_search or self.C + 32)
        self._row_of_seq = np.full(max(initial_rows, 1), -1, np.int64)

    # ------------------------------------------------------------------ seq -> row
    def _map_seq(self, seq: int, row: int) -> None:
        if seq >= self._row_of_seq.size:
            grown = np.full(max(seq + 1, 2 * self._row_of_seq.size), -1, np.int64)
            grown[: self._row_of_seq.size] = self._row_of_seq
            self._row_of_seq = grown
        self._row_of_seq[seq] = row

    def _rows(self, seqs: np.ndarray) -> np.ndarray:
        seqs = np.asarray(seqs, np.int64)
        ok = (seqs >= 0) & (seqs < self._row_of_seq.size)
        return np.where(ok, self._row_of_seq[np.clip(seqs, 0, self._row_of_seq.size - 1)], -1)

    def _search(self, vectors: np.ndarray, count: int) -> np.ndarray:
        """(B x count) rows of approximate neighbours, -1 where fewer came back."""
        res = self.ann.search(np.ascontiguousarray(vectors, np.float32), count)
        keys = np.asarray(res.keys, np.int64).reshape(len(vectors), -1)
        # one query answers Matches (1-D keys, as many as found), a batch BatchMatches (+ counts)
        found = np.asarray(res.counts).reshape(-1) if hasattr(res, "counts") else np.array([len(res.keys)])
        keys = np.where(np.arange(keys.shape[1])[None, :] < found[:, None], keys, -1)
        return self._rows(keys)

    # ------------------------------------------------------------------ the exact index's hooks
    def _candidates(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.n <= self.C:
            return super()._candidates(v)
        rows = self._search(v[None, :], self.C)[0]
        rows = rows[rows >= 0]
        return rows, self._vec[rows] @ v

    def add(self, key: Hashable, vector: np.ndarray, text: str, seq: int | None = None) -> None:
        super().add(key, vector, text, seq)
        r = self.n - 1
        s = int(self._seq[r])
        self._map_seq(s, r)
        self.ann.add(s, self._vec[r])

    def remove(self, key: Hashable) -> None:
        r = self.row_of[key]
        seq = int(self._seq[r])
        last_seq = int(self._seq[self.n - 1])
        self.ann.remove(seq)
        self._row_of_seq[seq] = -1
        if last_seq != seq:  # super() moves the last row into r before it recomputes lists
            self._row_of_seq[last_seq] = r
        super().remove(key)

    def _recompute(self, rows: np.ndarray, block: int = 1024) -> None:
        """Each row's list: its K best approximate neighbours (itself excluded), from a search for
        2K + 1 (lists only need their own top K; the C candidates serve inserts)."""
        n, K = self.n, self.capacity
        if n <= self.C + 1:
            return super()._recompute(rows, block)
        m = min(K, n - 1)
        for start in range(0, rows.size, block):
            rs = rows[start:start + block]
            cand = self._search(self._vec[rs], 2 * K + 1)
            sims = np.einsum("bd,bcd->bc", self._vec[rs], self._vec[np.clip(cand, 0, None)])
            sims[(cand < 0) | (cand == rs[:, None])] = -np.inf
            vals, pos = topk_rows(sims.astype(np.float32), m)
            self._nsim[rs] = -np.inf
            self._nrow[rs] = -1
            self._nsim[rs, :m] = vals
            self._nrow[rs, :m] = np.take_along_axis(cand, pos, axis=1)
            self._ncount[rs] = (vals > -np.inf).sum(axis=1)

    def load(self, keys: Sequence[Hashable], vectors: np.ndarray, texts: Sequence[str],
             seqs: Sequence[int], progress=None, compute: bool = True, graph: str | None = None) -> None:
        """``graph``: a file ``save_graph`` wrote; the points it lacks are added, the ones it has
        that are not loaded removed. Without it the graph is built from the vectors."""
        super().load(keys, vectors, texts, seqs, progress=None, compute=False)
        n = self.n
        s = self._seq[:n]
        if n:
            self._row_of_seq = np.full(int(s.max()) + 1, -1, np.int64)
            self._row_of_seq[s] = np.arange(n)
        todo = np.arange(n)
        if graph is not None:
            self.ann.load(graph)
            stored = np.asarray(self.ann.keys, np.int64) if len(self.ann) else np.zeros(0, np.int64)
            for gone in stored[self._rows(stored) < 0]:
                self.ann.remove(int(gone))
            todo = np.flatnonzero(~np.asarray(self.ann.contains(s), bool)) if n else todo
        for a in range(0, todo.size, 65536):  # in chunks, so a long load shows progress
            rows = todo[a:a + 65536]
            self.ann.add(s[rows], self._vec[rows])
            if progress:
                progress(min(todo.size, a + 65536), todo.size)
        if compute:
            self.rebuild(progress=progress)

    def save_graph(self, path: str) -> None:
        """Write the HNSW graph (at compaction, beside the lists' snapshot) so a restart loads it
        instead of re-adding every vector."""
        import os

        tmp = f"{path}.tmp-{os.getpid()}"
        self.ann.save(tmp)
        os.replace(tmp, path)

    def similar(self, vector: np.ndarray, k: int) -> list[tuple[Hashable, str, float]]:
        if self.n <= self.C:
            return super().similar(vector, k)
        v = np.asarray(vector, np.float32).reshape(self.dim)
        rows = self._search(v[None, :], max(k, self.C))[0]
        rows = rows[rows >= 0]
        s = self._vec[rows] @ v
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.keys[int(rows[i])], self.texts[int(rows[i])], float(s[i])) for i in order]
