"""``POST /compare``: two collections' points, read from the store, measured on one footing by
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
from negspace_controller.service import Controller
from negspace_controller.store import SEQ_KEY, TEXT_KEY, to_qdrant_id


def _read(controller: Controller, name: str, dim: int, group_by: str | None):
    """(ids, PointSet) of every point Qdrant holds for ``name``, in insertion order."""
    rows = sorted(controller.store.scan(name, with_vectors=True), key=lambda r: int(r[2].get(SEQ_KEY, 0)))
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


async def compare(controller: Controller, req: CompareRequest) -> CompareResponse:
    info_a = await controller.info(req.a)  # 404 for an unknown collection, before any work
    await controller.info(req.b)

    def run() -> CompareResponse:
        ids_a, a = _read(controller, req.a, info_a.dimension, req.group_by)
        ids_b, b = _read(controller, req.b, info_a.dimension, req.group_by)
        result = diversity.compare(a, b)
        return CompareResponse(a=_side(req.a, ids_a, a, result.a), b=_side(req.b, ids_b, b, result.b),
                               pca_basis="shared" if result.shared_basis else "own", notes=result.notes)

    return await asyncio.to_thread(run)
