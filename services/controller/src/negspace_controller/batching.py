"""Embeddings shared across concurrent requests: one batch per model call, each text embedded once.

``BatchingEncoder.encode`` is what the service awaits. Requests that arrive while the model is
busy wait in a queue; when it is free, ONE worker thread call embeds every distinct text of every
waiting request together (MiniLM on CPU: ~13 ms for one text, ~2 ms per text in a batch of 64),
and each request gets its rows back. A small LRU cache, keyed by the exact string the model sees
(after the query template, so a query and a document only share a vector when they embed the same
string), means the text a caller checked with ``/similar`` is not embedded again when it is
inserted. Results are the embedder's own (the same rows, batched or not, up to float rounding of
the batched matrix product).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from negspace_controller.embedding import Embedder


class BatchingEncoder:
    def __init__(self, embedder: Embedder, *, max_batch: int = 256, cache_size: int = 8192,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()
        self._queue: list[tuple[list[str], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.observe = observe or (lambda stage, seconds: None)
        self.model_calls = 0
        self.texts_embedded = 0

    def _cached(self, text: str) -> tuple[np.ndarray, bool] | None:
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
        return hit

    def _remember(self, text: str, vec: np.ndarray, truncated: bool) -> None:
        self._cache[text] = (vec, truncated)
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def encode(self, texts: list[str], *, query: bool = False) -> tuple[np.ndarray, list[bool]]:
        """(len(texts) x dimension unit vectors, truncated flags), like ``Embedder.encode``."""
        if not texts:
            return np.zeros((0, self.embedder.dimension), np.float32), []
        prepared = self.embedder.prepare(texts, query)
        if len(prepared) > self.max_batch:  # a bulk upsert: its own batches, not the shared queue
            missing = [t for t in dict.fromkeys(prepared) if self._cached(t) is None]
            for s in range(0, len(missing), self.max_batch):
                await self._embed(missing[s:s + self.max_batch])
        elif any(self._cached(t) is None for t in prepared):
            fut = asyncio.get_running_loop().create_future()
            self._queue.append((prepared, fut))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._drain())
            await fut
        rows = []
        for t in prepared:
            hit = self._cached(t)
            if hit is None:  # evicted meanwhile by a flood of other texts: embed it alone
                await self._embed([t])
                hit = self._cached(t)
            rows.append(hit)
        return np.stack([r[0] for r in rows]), [r[1] for r in rows]

    async def _drain(self) -> None:
        while self._queue:
            batch, texts = [], {}
            while self._queue and len(texts) < self.max_batch:
                prepared, fut = self._queue.pop(0)
                batch.append(fut)
                for t in prepared:
                    if self._cached(t) is None:
                        texts[t] = None
            try:
                if texts:
                    await self._embed(list(texts))
            except Exception as exc:
                for fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _embed(self, prepared: list[str]) -> None:
        """Embed strings that are already prepared (query template applied) and cache them."""
        t = time.perf_counter()
        vecs, truncated = await asyncio.to_thread(self.embedder.encode_prepared, prepared)
        self.observe("embed_batch", time.perf_counter() - t)
        self.model_calls += 1
        self.texts_embedded += len(prepared)
        for text, v, tr in zip(prepared, vecs, truncated, strict=True):
            self._remember(text, v, bool(tr))
