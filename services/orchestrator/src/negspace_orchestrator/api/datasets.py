"""``/runs/{id}/qa`` and ``/runs/{id}/export``: a finished run's Q/A pairs and its dataset exports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from negspace_contracts.orchestrator import ExportFormat, ExportRequest, ExportResult, QARequest, QAResult
from starlette.background import BackgroundTask

from negspace_orchestrator.api.deps import NDJSON, Orch, ndjson

router = APIRouter(prefix="/runs", tags=["datasets"])


@router.post("/{run_id}/qa", response_model=QAResult)
async def qa(run_id: str, orch: Orch, request: QARequest | None = None) -> QAResult:
    return await orch.convert_qa(run_id, request or QARequest())


@router.get("/{run_id}/qa", response_class=Response, responses=NDJSON)
async def qa_records(run_id: str, orch: Orch) -> Response:
    return ndjson(orch.qa_records(run_id))


@router.post("/{run_id}/export", response_model=ExportResult)
async def export(run_id: str, orch: Orch, request: ExportRequest | None = None) -> ExportResult:
    """Write the run's instructions and Q/A pairs with a dataset card (README.md) inside --data-dir."""
    return await orch.export(run_id, request or ExportRequest())


@router.get("/{run_id}/export", response_class=Response, responses={200: {"content": {"application/x-tar": {}}}})
async def export_archive(run_id: str, orch: Orch, format: ExportFormat = "hf",
                         license: Annotated[str, Query(max_length=100)] = "other") -> Response:
    """The same export as a tar archive (the folder's files at its root), for a client elsewhere."""
    path, tmp = await orch.export_archive(run_id, format, license)
    return FileResponse(path, media_type="application/x-tar", filename=f"{run_id}-{format}.tar",
                        background=BackgroundTask(tmp.cleanup))  # streamed from disk, then removed
