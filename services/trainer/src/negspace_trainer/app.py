"""The trainer's HTTP API: thin routers over the JobRunner."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse
from negspace_contracts.errors import ServiceUnavailableError
from negspace_contracts.trainer import (
    ArtifactList,
    Job,
    JobCreated,
    JobList,
    JobRequest,
    LocalTask,
    TaskList,
)
from negspace_servekit import create_app as _create_app
from negspace_servekit import health_response
from prometheus_client import Counter, Gauge

from negspace_trainer import local_tasks
from negspace_trainer.runner import JobRunner
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore

SERVICE = "trainer"


def get_runner(request: Request) -> JobRunner:
    runner = getattr(request.app.state, "runner", None)
    if runner is None:
        raise ServiceUnavailableError("the trainer is starting or stopping; retry in a moment")
    return runner


RunnerDep = Annotated[JobRunner, Depends(get_runner)]

jobs = APIRouter(prefix="/jobs", tags=["jobs"])


REPLAYED_HEADER = "Idempotent-Replayed"


@jobs.post("", status_code=201, response_model=JobCreated,
           responses={200: {"model": JobCreated, "description": "A repeat of an earlier request "
                            "with the same idempotency_key: the job it created (no new job)."},
                      409: {"description": "The idempotency_key was used for a different request."}})
async def create_job(body: JobRequest, runner: RunnerDep, response: Response) -> JobCreated:
    job, replayed = await runner.create(body)
    return _replayed(job, response) if replayed else JobCreated(id=job.id, status=job.status)


def _replayed(job: Job, response: Response) -> JobCreated:
    response.status_code = 200
    response.headers[REPLAYED_HEADER] = "true"
    return JobCreated(id=job.id, status=job.status, replayed=True)


@jobs.get("", response_model=JobList)
async def list_jobs(runner: RunnerDep, idempotency_key: Annotated[
        str | None, Query(max_length=255, description="Only the job created with this key "
                                                      "(an empty list if none was).")] = None) -> JobList:
    if idempotency_key is not None:
        found = runner.store.by_key(idempotency_key)
        return JobList(jobs=[runner.get(found[0])] if found else [])
    return JobList(jobs=runner.store.list())


@jobs.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, runner: RunnerDep) -> Job:
    return runner.get(job_id)


@jobs.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, runner: RunnerDep) -> Job:
    return await runner.cancel(job_id)


@jobs.get("/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(job_id: str, runner: RunnerDep,
                   tail: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> PlainTextResponse:
    return PlainTextResponse(runner.logs(job_id, tail))


@jobs.get("/{job_id}/artifacts", response_model=ArtifactList)
async def job_artifacts(job_id: str, runner: RunnerDep) -> ArtifactList:
    return runner.artifacts(job_id)


meta = APIRouter(tags=["meta"])


@meta.get("/tasks", response_model=TaskList)
async def list_tasks(request: Request) -> TaskList:
    include = str(request.app.state.tasks_dir)
    return TaskList(tasks=[LocalTask(name=t.name, description=t.description, num_docs=t.num_docs,
                                     include_path=include) for t in local_tasks.shipped_tasks()])


@meta.get("/health")
async def health(request: Request):
    runner: JobRunner | None = getattr(request.app.state, "runner", None)
    if runner is None:
        return health_response(SERVICE, "loading", "starting the job runner")
    return health_response(SERVICE, "ok", running=runner.busy, queued=runner.store.count("queued"),
                           workdir=str(runner.settings.resolved_workdir))


def create_app(settings: TrainerSettings | None = None, runner: JobRunner | None = None,
               start_worker: bool = True, worker_command=None) -> FastAPI:
    """``runner`` lets tests inject one;
    ``start_worker=False`` accepts jobs but never runs them (API tests, fuzzing);
    ``worker_command`` replaces ``python -m negspace_trainer.worker`` (tests: a fake worker)."""
    settings = settings or TrainerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        workdir = settings.resolved_workdir
        app.state.tasks_dir = local_tasks.materialize(workdir / "tasks")
        if not settings.dataset_dirs:  # the default place for dataset files: make it exist
            settings.allowed_dataset_dirs[0].mkdir(parents=True, exist_ok=True)
        own = runner is None
        r = runner or JobRunner(settings, JobStore(workdir / "jobs.sqlite"),
                                 start_worker=start_worker, worker_command=worker_command)
        r.on_finish = lambda status: app.state.jobs_finished.labels(status).inc()
        await r.start()
        app.state.runner = r
        try:
            yield
        finally:
            app.state.runner = None
            await r.stop()
            if own:
                r.store.close()

    app = _create_app(service=SERVICE, settings=settings, title="negspace trainer",
                      description="SFT jobs (TRL + PEFT) evaluated with lm-evaluation-harness",
                      lifespan=lifespan)
    app.include_router(jobs)
    app.include_router(meta)
    # Registered once per app (not per lifespan start): the gauges read whichever runner is live.
    registry = app.state.metrics_registry
    app.state.jobs_finished = Counter("negspace_trainer_jobs_finished", "Jobs finished, by status",
                                      ["status"], registry=registry)

    def _runner() -> JobRunner | None:
        return getattr(app.state, "runner", None)

    Gauge("negspace_trainer_jobs_queued", "Jobs waiting", registry=registry).set_function(
        lambda: _runner().store.count("queued") if _runner() is not None else 0)
    Gauge("negspace_trainer_jobs_running", "Jobs running", registry=registry).set_function(
        lambda: 1 if _runner() is not None and _runner().busy else 0)
    return app
