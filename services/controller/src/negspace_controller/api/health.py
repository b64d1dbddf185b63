"""``/health``: the embedder, the store and its engine, points per collection; 503 while loading
or while Qdrant does not answer (what still works is said)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from negspace_servekit import health_response

SERVICE = "controller"
router = APIRouter(tags=["health"])


@router.get("/health", include_in_schema=False)
async def health(request: Request):
    state = request.app.state
    controller = getattr(state, "controller", None)
    if controller is None:
        err = getattr(state, "load_error", None)
        return health_response(SERVICE, "error" if err else "loading", err)
    info = controller.health_info()
    for name, size in info["collections"].items():
        state.points_gauge.labels(name).set(size)
    problem = await controller.qdrant_problem()
    if problem is not None:
        return health_response(SERVICE, "error", f"{problem}. Routes that need Qdrant answer 503 "
                               "until it is back; /similar and /dense on loaded collections still "
                               "answer from memory", qdrant_status="down", **info)
    return health_response(SERVICE, "ok", qdrant_status="ok", **info)
