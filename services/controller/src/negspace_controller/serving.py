"""``Controller``: the serving class the routers call, and nothing else of the controller. It wires
the three jobs: ``registry.Collections`` (which collections are held, loading, snapshots,
ownership, reconciliation), ``writes.Writes`` (upsert, accept, delete) and ``queries.Queries``
(similar, dense, metrics, embed, the points of a comparison, health).

Writes to one collection are serialised (an asyncio lock); NumPy, Qdrant and embedding work
runs in worker threads so the event loop (and /health) stays responsive. Reads take only the
index's short thread lock, so they are not blocked while a write is embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from negspace_contracts.controller import (
    AcceptRequest,
    AcceptResponse,
    CollectionInfo,
    CompareRequest,
    CompareResponse,
    DenseResponse,
    MetricsRequest,
    MetricsResponse,
    PointIn,
    SimilarResponse,
    UpsertPointsResponse,
)

from negspace_controller import comparison
from negspace_controller.batching import BatchingEncoder
from negspace_controller.embedding import Embedder
from negspace_controller.queries import Queries
from negspace_controller.registry import Collections
from negspace_controller.store import Store
from negspace_controller.writes import Writes


class Controller:
    def __init__(self, embedder: Embedder, store: Store, *, knn_capacity: int = 32,
                 snapshot_dir: str | Path | None = None,
                 observe: Callable[[str, float], None] | None = None, index_mode: str = "exact",
                 approx_candidates: int | None = None, index_mmap: bool | None = None,
                 replica: str | None = None, replicas: Sequence[str] = ()) -> None:
        self.embedder = embedder
        self.store = store
        self.collections = Collections(embedder, store, knn_capacity=knn_capacity, snapshot_dir=snapshot_dir,
                                       index_mode=index_mode, approx_candidates=approx_candidates,
                                       index_mmap=index_mmap, replica=replica, replicas=replicas)
        # ``observe(stage, seconds)``: the app feeds its stage histogram (embed_batch, lock_wait,
        # check, qdrant_write, index_add); a no-op by default
        observe = observe or (lambda stage, seconds: None)
        self.encoder = BatchingEncoder(embedder, observe=observe)
        self.writes = Writes(self.collections, self.encoder, observe)
        self.queries = Queries(self.collections, self.encoder)

    # ------------------------------------------------------------------ life cycle and health
    async def warm_up(self, max_wait_s: float = 30.0) -> None:
        await self.collections.warm_up(max_wait_s)

    def save_snapshots(self) -> None:
        self.collections.save_snapshots()

    def health_info(self) -> dict:
        return self.queries.health_info()

    async def qdrant_problem(self) -> str | None:
        return await self.queries.qdrant_problem()

    # ------------------------------------------------------------------ collections
    async def create(self, name: str) -> tuple[CollectionInfo, bool]:
        return await self.collections.create(name)

    async def info(self, name: str) -> CollectionInfo:
        return await self.collections.info(name)

    async def delete(self, name: str) -> None:
        await self.collections.delete(name)

    # ------------------------------------------------------------------ writes
    async def upsert(self, name: str, points: list[PointIn]) -> UpsertPointsResponse:
        return await self.writes.upsert(name, points)

    async def accept(self, name: str, req: AcceptRequest) -> AcceptResponse:
        return await self.writes.accept(name, req)

    async def delete_points(self, name: str, ids: list) -> list:
        return await self.writes.delete_points(name, ids)

    # ------------------------------------------------------------------ queries
    async def similar(self, name: str, text: str, k: int, threshold: float,
                      threshold_quantile: float | None = None) -> SimilarResponse:
        return await self.queries.similar(name, text, k, threshold, threshold_quantile)

    async def dense(self, name: str, k: int, knn: int) -> DenseResponse:
        return await self.queries.dense(name, k, knn)

    async def metrics(self, name: str, req: MetricsRequest) -> MetricsResponse:
        return await self.queries.metrics(name, req)

    async def embed(self, texts: list[str], query: bool) -> tuple[np.ndarray, list[bool]]:
        return await self.queries.embed(texts, query)

    async def compare(self, req: CompareRequest) -> CompareResponse:
        return await comparison.compare(self.queries, req)
