"""``/jobs``: create (idempotent with a key), list and follow jobs, their logs and artifacts; cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse
from negspace_contracts.trainer import ArtifactList, Job, JobCreated, JobList, JobRequest

from negspace_trainer.api.deps import TrainerDep

router = APIRouter(prefix="/jobs", tags=["jobs"])

REPLAYED_HEADER = "Idempotent-Replayed"


@router.post("", status_code=201, response_model=JobCreated,
             responses={200: {"model": JobCreated, "description": "A repeat of an earlier request "
                              "with the same idempotency_key: the job it created (no new job)."},
                        409: {"description": "The idempotency_key was used for a different request."}})
async def create_job(body: JobRequest, trainer: TrainerDep, response: Response) -> JobCreated:
    job, replayed = await trainer.create(body)
    if not replayed:
        return JobCreated(id=job.id, status=job.status)
    response.status_code = 200
    response.headers[REPLAYED_HEADER] = "true"
    return JobCreated(id=job.id, status=job.status, replayed=True)


@router.get("", response_model=JobList)
async def list_jobs(trainer: TrainerDep, idempotency_key: Annotated[
        str | None, Query(max_length=255, description="Only the job created with this key "
                                                      "(an empty list if none was).")] = None) -> JobList:
    return trainer.list_jobs(idempotency_key)


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, trainer: TrainerDep) -> Job:
    return trainer.get(job_id)


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(job_id: str, trainer: TrainerDep,
                   tail: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> PlainTextResponse:
    return PlainTextResponse(trainer.logs(job_id, tail))


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
async def job_artifacts(job_id: str, trainer: TrainerDep) -> ArtifactList:
    return trainer.artifacts(job_id)


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, trainer: TrainerDep) -> Job:
    return await trainer.cancel(job_id)
