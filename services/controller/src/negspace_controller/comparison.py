"""``POST /compare``: two collections' points, read from the store (``Queries.stored_points``), measured on one footing by
``diversity.compare`` (one PCA basis fitted on both; per-collection and per-group metrics; the 2-D map)."""

from __future__ import annotations

import asyncio

import numpy as np
from negspace_contracts.controller import (
    CollectionComparison,
    CompareRequest,
    CompareResponse,
    MapPoint,
    MetricsResponse,
)

from negspace_controller import diversity
from negspace_controller.queries import Queries
from negspace_controller.store import TEXT_KEY, to_qdrant_id


def _read(queries: Queries, name: str, dim: int, group_by: str | None):
    """(ids, PointSet) of every point Qdrant holds for ``name``, in insertion order."""
    rows = queries.stored_points(name)
    vecs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, dim), np.float32)
    groups = [r[2].get(group_by) for r in rows] if group_by else None
    return ([to_qdrant_id(r[0]) for r in rows],
            diversity.PointSet(vecs, [str(r[2].get(TEXT_KEY, "")) for r in rows], groups))


def _side(name: str, ids: list, points: diversity.PointSet, rep: diversity.SetReport) -> CollectionComparison:
    xy = rep.xy if rep.xy is not None else np.zeros((0, 2))
    groups = points.groups or [None] * len(ids)
    return CollectionComparison(
        name=name, metrics=MetricsResponse(**rep.metrics.as_dict()),
        groups={k: MetricsResponse(**m.as_dict()) for k, m in rep.groups.items()},
        points=[MapPoint(id=i, x=float(x), y=float(y), group=g)
                for i, (x, y), g in zip(ids, xy, groups, strict=False)])


async def compare(queries: Queries, req: CompareRequest) -> CompareResponse:
    info_a = await queries.collections.info(req.a)  # 404 for an unknown collection, before any work
    await queries.collections.info(req.b)

    def run() -> CompareResponse:
        ids_a, a = _read(queries, req.a, info_a.dimension, req.group_by)
        ids_b, b = _read(queries, req.b, info_a.dimension, req.group_by)
        result = diversity.compare(a, b)
        return CompareResponse(a=_side(req.a, ids_a, a, result.a), b=_side(req.b, ids_b, b, result.b),
                               pca_basis="shared" if result.shared_basis else "own", notes=result.notes)

    return await asyncio.to_thread(run)
