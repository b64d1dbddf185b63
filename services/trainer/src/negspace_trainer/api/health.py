"""``/health``: "loading" until the job runner has started, then the running job and the queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from negspace_servekit import health_response

from negspace_trainer.api.deps import current_trainer

router = APIRouter(tags=["meta"])


@router.get("/health")
async def health(request: Request):
    trainer = current_trainer(request)
    if trainer is None:
        return health_response("trainer", "loading", "starting the job runner")
    return health_response("trainer", "ok", **trainer.health())
