"""The trainer's HTTP API (shapes in ``negspace_contracts.trainer``)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from negspace_contracts.trainer import (
    Artifact,
    ArtifactList,
    Job,
    JobCreated,
    JobList,
    JobRequest,
    JobStatus,
    LocalTask,
    TaskList,
)
from negspace_servekit import create_app as servekit_app
from negspace_servekit import health_response
from prometheus_client import Gauge

from negspace_trainer import __version__, local_tasks
from negspace_trainer.jobs import JobRunner
from negspace_trainer.settings import TrainerSettings

SERVICE = "trainer"


def get_runner(request: Request) -> JobRunner:
    return request.app.state.runner


Runner = Annotated[JobRunner, Depends(get_runner)]

jobs = APIRouter(prefix="/jobs", tags=["jobs"])


@jobs.post("", status_code=201, response_model=JobCreated)
async def create_job(request: JobRequest, runner: Runner) -> JobCreated:
    """Queue a fine-tune (+ evaluation). Dataset problems answer 422 before anything is queued."""
    job = await runner.submit(request)
    return JobCreated(id=job.id, status=job.status)


@jobs.get("", response_model=JobList)
async def list_jobs(runner: Runner, status: JobStatus | None = None) -> JobList:
    return JobList(jobs=runner.store.list(status))


@jobs.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, runner: Runner) -> Job:
    return runner.get(job_id)


@jobs.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, runner: Runner) -> Job:
    """Queued: cancelled at once. Running: the worker is stopped (SIGTERM, then SIGKILL after a
    grace) and the job turns ``cancelled`` when it has exited. Finished: unchanged."""
    return await runner.cancel(job_id)


@jobs.get("/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(job_id: str, runner: Runner,
                   tail_bytes: Annotated[int | None, Query(ge=1, le=64 * 1024 * 1024)] = None) -> PlainTextResponse:
    """The worker's stdout and stderr (training, evaluation, tracebacks)."""
    return PlainTextResponse(runner.log_text(job_id, tail_bytes))


@jobs.get("/{job_id}/artifacts", response_model=ArtifactList)
async def job_artifacts(job_id: str, runner: Runner) -> ArtifactList:
    """Files under the job's artifacts folder: ``adapter/`` (LoRA) or ``model/`` (full), ``metrics.json``."""
    root, files = runner.artifacts(job_id)
    return ArtifactList(job_id=job_id, root=str(root),
                        artifacts=[Artifact(name=name, path=str(path), size_bytes=size) for name, path, size in files])


tasks = APIRouter(prefix="/tasks", tags=["tasks"])


@tasks.get("", response_model=TaskList)
async def list_tasks(runner: Runner) -> TaskList:
    """The lm-eval tasks shipped with the trainer (evaluation offline). Any lm-eval task name
    also works where its data is reachable."""
    return TaskList(tasks=[LocalTask(name=t.name, description=t.description, num_docs=t.num_docs,
                                     include_path=str(runner.tasks_dir))
                           for t in local_tasks.shipped_tasks()])


def create_app(settings: TrainerSettings, start_worker: bool = True) -> FastAPI:
    """The trainer app. ``start_worker=False`` keeps jobs queued (nothing trains): API tests, fuzzing."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner = JobRunner(settings, start_worker=start_worker)
        app.state.runner = runner
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = servekit_app(service=SERVICE, settings=settings, title="negspace trainer", lifespan=lifespan,
                       version=__version__,
                       description="Fine-tune (TRL SFTTrainer, PEFT LoRA or full) and evaluate "
                                   "(lm-evaluation-harness) as jobs, each in its own worker process.")
    app.include_router(jobs)
    app.include_router(tasks)

    def _count(status: str):
        def read() -> float:
            runner = getattr(app.state, "runner", None)
            return float(runner.store.count(status)) if runner is not None else 0.0
        return read

    gauge = Gauge("negspace_trainer_jobs", "Jobs by status", ["status"], registry=app.state.metrics_registry)
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        gauge.labels(status).set_function(_count(status))

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> JSONResponse:
        runner = getattr(request.app.state, "runner", None)
        if runner is None:
            return health_response(SERVICE, "loading", "starting up")
        return health_response(SERVICE, "ok", workdir=str(runner.root), queued=runner.store.count("queued"),
                               running=runner.store.count("running"), worker=start_worker)

    return app
