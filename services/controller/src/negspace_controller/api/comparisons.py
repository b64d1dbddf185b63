"""``POST /compare``: two collections on one footing."""

from __future__ import annotations

from fastapi import APIRouter
from negspace_contracts.controller import (
    CompareRequest,
    CompareResponse,
)

from negspace_controller.api.deps import ControllerDep

router = APIRouter(tags=["metrics"])


@router.post("/compare", response_model=CompareResponse)
async def compare(body: CompareRequest, controller: ControllerDep) -> CompareResponse:
    """Collections ``a`` and ``b`` on one PCA basis fitted on both: metrics of each (and of each
    ``group_by`` value), and every point on their shared 2-D map."""
    return await controller.compare(body)
