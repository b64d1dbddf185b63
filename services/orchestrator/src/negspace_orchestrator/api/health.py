"""``/health``: the orchestrator, its runs per status and each dependency's state."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from negspace_servekit import health_response

from negspace_orchestrator.api.deps import Orch

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(orch: Orch) -> JSONResponse:
    return health_response("orchestrator", "ok", **await orch.health())
