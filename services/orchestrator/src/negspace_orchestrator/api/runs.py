"""``/runs``: create, list, follow, cancel and resume runs; their instructions, metrics and events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from negspace_contracts.controller import MetricsRequest, MetricsResponse
from negspace_contracts.orchestrator import (
    MAX_RUNS_PAGE_SIZE,
    RUNS_PAGE_SIZE,
    Run,
    RunComparison,
    RunConfig,
    RunCreated,
    RunList,
    RunStatus,
)

from negspace_orchestrator.api.deps import NDJSON, Orch, ndjson

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=201, response_model=RunCreated)
async def create_run(config: RunConfig, orch: Orch) -> RunCreated:
    run = orch.create_run(config)
    return RunCreated(id=run.id, status=run.status)  # type: ignore[arg-type]


@router.get("", response_model=RunList)
async def list_runs(orch: Orch, status: RunStatus | None = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_RUNS_PAGE_SIZE)] = RUNS_PAGE_SIZE,
                    after: Annotated[str | None, Query(max_length=200)] = None) -> RunList:
    """A page of runs in creation order; pass ``next_after`` as ``?after=`` for the next one."""
    return orch.list_runs(status, limit, after)


@router.get("/{run_id}", response_model=Run)
async def get_run(run_id: str, orch: Orch) -> Run:
    return orch.get_run(run_id)


@router.post("/{run_id}/cancel", response_model=Run)
async def cancel_run(run_id: str, orch: Orch) -> Run:
    return await orch.cancel(run_id)


@router.post("/{run_id}/resume", response_model=Run)
async def resume_run(run_id: str, orch: Orch) -> Run:
    return orch.resume(run_id)


@router.get("/{run_id}/instructions", response_class=Response, responses=NDJSON)
async def instructions(run_id: str, orch: Orch) -> Response:
    return ndjson(orch.instructions(run_id))


@router.get("/{run_id}/metrics", response_model=MetricsResponse)
async def metrics(run_id: str, orch: Orch) -> MetricsResponse:
    """Diversity metrics of the run's accepted instructions (its own controller collection)."""
    return await orch.metrics(run_id, MetricsRequest())


@router.get("/{run_id}/compare", response_model=RunComparison)
async def compare(run_id: str, orch: Orch,
                  other: Annotated[str, Query(alias="with", min_length=1, max_length=200)]) -> RunComparison:
    """The run and run ``with`` on one PCA basis fitted on both: each run's and each round's
    diversity metrics and the 2-D map of their instructions."""
    return await orch.compare(run_id, other)


@router.post("/{run_id}/metrics", response_model=MetricsResponse)
async def metrics_with_basis(run_id: str, request: MetricsRequest, orch: Orch) -> MetricsResponse:
    """The same, with a fixed PCA basis/mean so the hull volumes of two runs compare alike."""
    return await orch.metrics(run_id, request)


@router.get("/{run_id}/events")
async def events(run_id: str, orch: Orch, after: Annotated[int, Query(ge=0)] = 0,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Server-sent events: ``id`` = seq, ``event`` = type, ``data`` = the RunEvent JSON.

    Reconnect with ``?after=<last seq>`` (or ``Last-Event-ID``); the stream ends once the run is
    completed, failed or cancelled and every event so far was sent.
    """
    orch.run_or_404(run_id)
    if last_event_id and last_event_id.isdigit():
        after = max(after, int(last_event_id))
    return StreamingResponse(orch.event_stream(run_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
