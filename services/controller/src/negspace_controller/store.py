"""Qdrant, the system of record: one collection per run; ids, unit vectors and payloads.

Every point's payload holds ``text``, ``_seq`` (the controller's insertion sequence, which
fixes the in-memory row order and tie-breaks across restarts) and the caller's keys (run,
node, round, ...). Works against a Qdrant server (``url``) or local mode (a folder or
``:memory:``). Local mode is not thread-safe, so every call holds one lock.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

SEQ_KEY = "_seq"
TEXT_KEY = "text"
RESERVED_KEYS = frozenset({SEQ_KEY, TEXT_KEY})


def to_key(point_id: Any) -> Hashable:
    """Canonical in-memory key: int, or uuid.UUID (Qdrant returns UUIDs as strings)."""
    if isinstance(point_id, bool):
        raise TypeError("bool is not a point id")
    if isinstance(point_id, int):
        return point_id
    if isinstance(point_id, uuid.UUID):
        return point_id
    return uuid.UUID(str(point_id))


def to_qdrant_id(key: Hashable) -> int | str:
    return key if isinstance(key, int) else str(key)


class QdrantStore:
    def __init__(self, *, url: str | None = None, path: str | None = None, api_key: str | None = None,
                 prefix: str = "negspace_") -> None:
        if url:
            self.client = QdrantClient(url=url, api_key=api_key)
            self.where = url
        elif path == ":memory:":
            self.client = QdrantClient(location=":memory:")
            self.where = ":memory:"
        else:
            self.client = QdrantClient(path=path)
            self.where = path or ""
        self.prefix = prefix
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self.client.close()

    def qname(self, name: str) -> str:
        return self.prefix + name

    def names(self) -> list[str]:
        with self._lock:
            cols = self.client.get_collections().collections
        return sorted(c.name[len(self.prefix):] for c in cols if c.name.startswith(self.prefix))

    def exists(self, name: str) -> bool:
        with self._lock:
            return self.client.collection_exists(self.qname(name))

    def dimension(self, name: str) -> tuple[int, str | None]:
        """(vector size, embedder recorded at creation or None)."""
        with self._lock:
            info = self.client.get_collection(self.qname(name))
        vectors = info.config.params.vectors
        size = vectors.size if isinstance(vectors, models.VectorParams) else next(iter(vectors.values())).size
        meta = getattr(info.config, "metadata", None) or {}
        return int(size), meta.get("embedder")

    def create(self, name: str, dimension: int, embedder: str) -> None:
        with self._lock:
            self.client.create_collection(
                self.qname(name),
                vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
                metadata={"embedder": embedder})

    def drop(self, name: str) -> None:
        with self._lock:
            self.client.delete_collection(self.qname(name))

    def count(self, name: str) -> int:
        with self._lock:
            return int(self.client.count(self.qname(name), exact=True).count)

    def upsert(self, name: str, keys: list[Hashable], vectors: np.ndarray, payloads: list[dict]) -> None:
        points = [models.PointStruct(id=to_qdrant_id(k), vector=v.tolist(), payload=p)
                  for k, v, p in zip(keys, vectors, payloads, strict=True)]
        with self._lock:
            for start in range(0, len(points), 512):
                self.client.upsert(self.qname(name), points=points[start:start + 512], wait=True)

    def delete_points(self, name: str, keys: list[Hashable]) -> None:
        with self._lock:
            self.client.delete(self.qname(name), points_selector=models.PointIdsList(
                points=[to_qdrant_id(k) for k in keys]), wait=True)

    def scan(self, name: str, *, with_vectors: bool = True, where: Mapping[str, Any] | None = None,
             batch: int = 2048) -> Iterator[tuple[Hashable, np.ndarray | None, dict]]:
        flt = payload_filter(where) if where else None
        offset = None
        while True:
            with self._lock:
                records, offset = self.client.scroll(self.qname(name), scroll_filter=flt, limit=batch,
                                                     offset=offset, with_payload=True,
                                                     with_vectors=with_vectors)
            for r in records:
                vec = np.asarray(r.vector, np.float32) if with_vectors else None
                yield to_key(r.id), vec, dict(r.payload or {})
            if offset is None:
                return


def payload_filter(where: Mapping[str, Any]) -> models.Filter:
    must: list[models.Condition] = []
    for key, value in where.items():
        if value is None:
            must.append(models.IsNullCondition(is_null=models.PayloadField(key=key)))
        elif isinstance(value, float) and not value.is_integer():
            must.append(models.FieldCondition(key=key, range=models.Range(gte=value, lte=value)))
        else:
            if isinstance(value, float):
                value = int(value)
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    return models.Filter(must=must)
