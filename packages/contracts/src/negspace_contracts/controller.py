"""Controller API: embeddings in Qdrant, nearest neighbours, dense-region samples, metrics."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from negspace_contracts._http import Resource, ServiceClient
from negspace_contracts.common import StrictModel

MAX_POINTS_PER_UPSERT = 1024
MAX_TEXTS_PER_EMBED = 1024
COLLECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$"

PointId = int | uuid.UUID
PayloadValue = str | int | float | bool | None


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text must not be empty or whitespace")
    return v


class CollectionInfo(StrictModel):
    name: str
    count: int
    dimension: int
    embedder: str


class PointIn(StrictModel):
    id: PointId = Field(..., description="Unsigned integer or UUID; re-sending an id overwrites it.")
    text: str
    payload: dict[str, Any] = Field(default_factory=dict)

    _check_text = field_validator("text")(_non_blank)

    @field_validator("id")
    @classmethod
    def _unsigned(cls, v: PointId) -> PointId:
        if isinstance(v, int) and v < 0:
            raise ValueError("integer point ids must be >= 0 (Qdrant ids are unsigned or UUIDs)")
        return v


class UpsertPointsRequest(StrictModel):
    points: list[PointIn] = Field(..., min_length=1, max_length=MAX_POINTS_PER_UPSERT)


class UpsertPointsResponse(StrictModel):
    ids: list[PointId]
    truncated: list[bool] = Field(default_factory=list,
                                  description="Per point: text was cut to the embedder's length.")


class DeletePointsRequest(StrictModel):
    ids: list[PointId] = Field(..., min_length=1, max_length=MAX_POINTS_PER_UPSERT)


class DeletePointsResponse(StrictModel):
    ids: list[PointId] = Field(..., description="The ids asked for (unknown ids are ignored).")


class SimilarRequest(StrictModel):
    text: str
    k: int = Field(5, ge=1, le=1000)
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    threshold_quantile: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Calibrated threshold: is_similar when max_similarity >= this quantile of the collection's "
                    "nearest-neighbour similarities (each point's cosine to its closest other point), so the "
                    "bar means the same for any embedder. Needs 2 points; below that `threshold` applies.")

    _check_text = field_validator("text")(_non_blank)


class Neighbor(StrictModel):
    id: PointId
    text: str
    score: float


class SimilarResponse(StrictModel):
    neighbors: list[Neighbor]
    max_similarity: float | None = Field(None, description="None when the collection is empty.")
    is_similar: bool
    threshold: float | None = Field(None, description="The bar is_similar was judged against (the quantile's "
                                                      "value when threshold_quantile was given).")


class AcceptRequest(StrictModel):
    """The acceptance step of a guided run as one atomic call: judge ``point.text`` against the
    collection (as ``/similar`` does) and insert it when it is not too similar, or when ``force``
    (the last retry). Check and insert hold the collection's write lock together, so concurrent
    callers need no lock of their own and every check sees every point accepted before it. A
    point already stored under the same id (a replayed slot) is left out of its own check."""

    point: PointIn
    k: int = Field(1, ge=1, le=1000)
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    threshold_quantile: float | None = Field(None, gt=0.0, lt=1.0)
    force: bool = Field(False, description="Insert even when too similar (the judgement is still returned).")


class AcceptResponse(SimilarResponse):
    accepted: bool = Field(..., description="The point was inserted.")
    truncated: bool = Field(False, description="The embedder truncated the text.")


class DenseRequest(StrictModel):
    k: int = Field(3, ge=1, le=1000)
    knn: int = Field(5, ge=1, le=100)


class DenseItem(StrictModel):
    id: PointId
    text: str
    density: float


class DenseResponse(StrictModel):
    items: list[DenseItem]


class MetricsRequest(StrictModel):
    filter: dict[str, PayloadValue] | None = Field(
        None, description="Only points whose payload has these exact key/values.")
    pca_basis: list[list[float]] | None = Field(
        None, description="Fixed projection (4 x dim) for hull volume, so datasets compare alike.")
    pca_mean: list[float] | None = None


class MetricsResponse(StrictModel):
    n: int
    semantic_diversity: float | None
    mst_diversity: float | None
    hull_volume: float | None
    vendi_score: float | None
    distinct_1: float | None
    distinct_2: float | None
    notes: dict[str, str] = Field(default_factory=dict,
                                  description="Why a metric is None (too few points, degenerate hull).")


PAYLOAD_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$"


class CompareRequest(StrictModel):
    """Two collections measured on one footing: one PCA basis fitted on the union of their points
    (hull volumes and the 2-D map compare alike), and per ``group_by`` value metrics of each."""

    a: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    b: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    group_by: str | None = Field(None, pattern=PAYLOAD_KEY_PATTERN, max_length=128,
                                 description="A payload key (e.g. round): metrics per value of it too.")


class MapPoint(StrictModel):
    """One point on the 2 principal axes of both collections' points."""

    id: PointId
    x: float
    y: float
    group: PayloadValue = Field(None, description="The point's ``group_by`` payload value.")


class CollectionComparison(StrictModel):
    name: str
    metrics: MetricsResponse
    groups: dict[str, MetricsResponse] = Field(
        default_factory=dict, description="Per ``group_by`` value (as a string), in sorted value order.")
    points: list[MapPoint] = Field(default_factory=list,
                                   description="Every point on the shared 2-D map (empty without one).")


class CompareResponse(StrictModel):
    a: CollectionComparison
    b: CollectionComparison
    pca_basis: Literal["shared", "own"] = Field(
        ..., description="shared: every hull volume (per collection and per group) uses one 4-D basis fitted "
                         "on both collections; own: too few points for it, each set fits its own.")
    notes: dict[str, str] = Field(default_factory=dict, description="Why the shared basis or the map is missing.")


class EmbedRequest(StrictModel):
    texts: list[str] = Field(..., min_length=1, max_length=MAX_TEXTS_PER_EMBED)
    query: bool = Field(False, description="Apply the configured query instruction (e5-style).")

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"texts[{i}] is empty")
        return v


class EmbedResponse(StrictModel):
    embeddings: list[list[float]]
    truncated: list[bool]


def controller_for(collection: str, urls: Sequence[str]) -> str:
    """The controller replica that owns ``collection``: rendezvous (highest-random-weight) hashing
    of the name over the replica URLs. Stable across processes and restarts; adding or removing a
    replica moves only the collections that replica gains or loses (~1/N of them). The
    orchestrator asks it once per run, when the run is created, and records the answer with the
    run: every later call of that collection goes to the recorded replica, so a replica added
    later moves nothing and each collection's index lives in exactly one replica's memory."""
    if not urls:
        raise ValueError("controller_for needs at least one controller URL")

    def weight(url: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{url}\x00{collection}".encode(), digest_size=8).digest(), "big")

    return max(urls, key=weight)


class _Collections(Resource):
    async def create(self, name: str) -> CollectionInfo:
        return await self._client.call("PUT", f"/collections/{name}", CollectionInfo)

    async def get(self, name: str) -> CollectionInfo:
        return await self._client.call("GET", f"/collections/{name}", CollectionInfo)

    async def delete(self, name: str) -> None:
        await self._client.send("DELETE", f"/collections/{name}")

    async def upsert(self, name: str, points: list[PointIn]) -> UpsertPointsResponse:
        return await self._client.call("POST", f"/collections/{name}/points", UpsertPointsResponse,
                                       json_body=UpsertPointsRequest(points=points))

    async def delete_points(self, name: str, ids: list[PointId]) -> DeletePointsResponse:
        return await self._client.call("POST", f"/collections/{name}/points/delete", DeletePointsResponse,
                                       json_body=DeletePointsRequest(ids=ids))

    async def similar(self, name: str, text: str, *, k: int = 5, threshold: float = 0.9,
                      threshold_quantile: float | None = None) -> SimilarResponse:
        return await self._client.call("POST", f"/collections/{name}/similar", SimilarResponse,
                                       json_body=SimilarRequest(text=text, k=k, threshold=threshold,
                                                                threshold_quantile=threshold_quantile))

    async def accept(self, name: str, point: PointIn, *, k: int = 1, threshold: float = 0.9,
                     threshold_quantile: float | None = None, force: bool = False) -> AcceptResponse:
        return await self._client.call("POST", f"/collections/{name}/accept", AcceptResponse,
                                       json_body=AcceptRequest(point=point, k=k, threshold=threshold,
                                                               threshold_quantile=threshold_quantile, force=force))

    async def dense(self, name: str, *, k: int = 3, knn: int = 5) -> DenseResponse:
        return await self._client.call("POST", f"/collections/{name}/dense", DenseResponse,
                                       json_body=DenseRequest(k=k, knn=knn))

    async def metrics(self, name: str, request: MetricsRequest | None = None) -> MetricsResponse:
        return await self._client.call("POST", f"/collections/{name}/metrics", MetricsResponse,
                                       json_body=request or MetricsRequest())


class ControllerClient(ServiceClient):
    """``ControllerClient(url).collections.dense("run-1", k=3, knn=5)``."""

    def __init__(self, base_url: str, **kw) -> None:
        super().__init__(base_url, **kw)
        self.collections = _Collections(self)

    async def compare(self, a: str, b: str, *, group_by: str | None = None) -> CompareResponse:
        """Collections ``a`` and ``b`` on one PCA basis (see ``CompareRequest``)."""
        return await self.call("POST", "/compare", CompareResponse,
                               json_body=CompareRequest(a=a, b=b, group_by=group_by))

    async def embed(self, texts: list[str], *, query: bool = False) -> EmbedResponse:
        return await self.call("POST", "/embed", EmbedResponse,
                               json_body=EmbedRequest(texts=texts, query=query))
