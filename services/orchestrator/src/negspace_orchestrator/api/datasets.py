"""``/runs/{id}/qa`` and ``/runs/{id}/export``: a finished run's Q/A pairs and its dataset exports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from negspace_contracts.errors import ConflictError
from negspace_contracts.orchestrator import ExportFormat, ExportRequest, ExportResult, QARequest, QAResult
from starlette.background import BackgroundTask

from negspace_orchestrator import qa as qa_mod
from negspace_orchestrator.api import deps
from negspace_orchestrator.api.deps import NDJSON, Orch

router = APIRouter(prefix="/runs", tags=["datasets"])


@router.post("/{run_id}/qa", response_model=QAResult)
async def qa(run_id: str, orch: Orch, request: QARequest | None = None) -> QAResult:
    return await orch.qa.convert(orch.run_or_404(run_id), request or QARequest())


@router.get("/{run_id}/qa", response_class=Response, responses=NDJSON)
async def qa_records(run_id: str, orch: Orch) -> Response:
    orch.run_or_404(run_id)
    if not orch.store.has_qa_records(run_id):
        raise ConflictError(f"run {run_id} has no Q/A records: POST /runs/{run_id}/qa first")
    return deps.ndjson(lambda n: ([qa_mod.chat_record(q, a) for q, a in batch]
                                  for batch in orch.store.iter_qa_records(run_id, n)))


@router.post("/{run_id}/export", response_model=ExportResult)
async def export(run_id: str, orch: Orch, request: ExportRequest | None = None) -> ExportResult:
    """Write the run's instructions and Q/A pairs with a dataset card (README.md) inside --data-dir."""
    return await orch.exports.to_folder(orch.run_or_404(run_id), request or ExportRequest())


@router.get("/{run_id}/export", response_class=Response, responses={200: {"content": {"application/x-tar": {}}}})
async def export_archive(run_id: str, orch: Orch, format: ExportFormat = "hf",
                         license: Annotated[str, Query(max_length=100)] = "other") -> Response:
    """The same export as a tar archive (the folder's files at its root), for a client elsewhere."""
    path, tmp = await orch.exports.to_archive(orch.run_or_404(run_id), format, license)
    return FileResponse(path, media_type="application/x-tar", filename=f"{run_id}-{format}.tar",
                        background=BackgroundTask(tmp.cleanup))  # streamed from disk, then removed
