from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from negspace_contracts.common import HealthResponse
from negspace_servekit import health_response

from negspace_node.api.deps import Service

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(service: Service) -> JSONResponse:
    """200 when the engine is ready; 503 while it loads or after it failed, with the reason."""
    status, detail, info = service.health()
    return health_response("node", status, detail, **info)
