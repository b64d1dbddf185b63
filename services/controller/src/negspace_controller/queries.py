"""Reads: nearest neighbours, dense regions, diversity metrics, embeddings, the points a
comparison reads, and what /health reports. Reads take only the index's short thread lock, so
they are not blocked while a write is embedding."""

from __future__ import annotations

import asyncio
import re

import numpy as np
from negspace_contracts.controller import (
    DenseItem,
    DenseResponse,
    MetricsRequest,
    MetricsResponse,
    Neighbor,
    SimilarResponse,
)
from negspace_contracts.errors import BadRequestError, ServiceUnavailableError

from negspace_controller import diversity, threads
from negspace_controller.batching import BatchingEncoder
from negspace_controller.registry import Collections
from negspace_controller.store import SEQ_KEY, TEXT_KEY

_PAYLOAD_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


class Queries:
    def __init__(self, collections: Collections, encoder: BatchingEncoder) -> None:
        self.collections = collections
        self.store = collections.store
        self.embedder = collections.embedder
        self.encoder = encoder
        self.knn_capacity = collections.knn_capacity
        self.blas_threads = threads.current()  # what OpenBLAS reports (set by --blas-threads at start-up)
        self._probe: asyncio.Future | None = None  # the Qdrant probe /health calls share

    def health_info(self) -> dict:
        """What ``/health`` reports: the embedder (and what runs it), where Qdrant is and which engine (server, edge,
        local), points held per collection."""
        return dict(embedder=self.embedder.name, dimension=self.embedder.dimension,
                    embed_backend=self.embedder.backend, qdrant=self.store.where,
                    qdrant_engine=self.store.engine, collections={name: len(c.index) for name, c in self.collections.loaded.items()},
                    knn_capacity=self.knn_capacity, index_mode=self.collections.index_mode,
                    blas_threads=self.blas_threads, replica=self.collections.replica,
                    replicas=len(self.collections.replicas) or 1)

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

    async def similar(self, name: str, text: str, k: int, threshold: float,
                      threshold_quantile: float | None = None) -> SimilarResponse:
        """Nearest stored points; ``is_similar`` against ``threshold`` or, when given, against the
        ``threshold_quantile`` of the collection's nearest-neighbour similarities (2+ points)."""
        col = await self.collections.get(name)
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
        col = await self.collections.get(name)

        def run():
            with col.index.lock:
                return col.index.dense(k, knn)

        hits = await asyncio.to_thread(run)
        return DenseResponse(items=[DenseItem(id=h.key, text=h.text, density=h.density) for h in hits])

    async def metrics(self, name: str, req: MetricsRequest) -> MetricsResponse:
        col = await self.collections.get(name)
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


    def stored_points(self, name: str) -> list[tuple]:
        """(key, vector, payload) of every point Qdrant holds for ``name``, in insertion order
        (a worker thread's call: it reads the whole collection)."""
        return sorted(self.store.scan(name, with_vectors=True), key=lambda r: int(r[2].get(SEQ_KEY, 0)))


def _float_array(values, shape: tuple[int, ...], param: str, expected: str) -> np.ndarray:
    """A request's nested number lists as an array of exactly ``shape``, or a 400 naming ``param``."""
    try:
        arr = np.asarray(values, np.float64)
    except ValueError:  # ragged rows
        arr = None
    if arr is None or arr.shape != shape or not np.isfinite(arr).all():
        raise BadRequestError(f"{param} must be {expected} (finite)", param=param)
    return arr
