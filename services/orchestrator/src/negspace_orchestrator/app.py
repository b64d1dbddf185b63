"""The orchestrator's HTTP API (shapes in ``negspace_contracts.orchestrator``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from negspace_contracts.controller import MetricsRequest, MetricsResponse
from negspace_contracts.errors import (
    BadRequestError,
    ConflictError,
    NegspaceError,
    NotFoundError,
    ServiceUnavailableError,
    is_retryable,
)
from negspace_contracts.orchestrator import (
    MAX_RUNS_PAGE_SIZE,
    RUNS_PAGE_SIZE,
    TERMINAL_RUN_STATUSES,
    ExportFormat,
    ExportRequest,
    ExportResult,
    QARequest,
    QAResult,
    Run,
    RunConfig,
    RunCreated,
    RunList,
    RunStatus,
    TrainRequest,
)
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES, DatasetSpec, Job, JobRequest
from negspace_servekit import create_app as servekit_app
from negspace_servekit import health_response

from negspace_orchestrator import export as export_mod
from negspace_orchestrator import qa as qa_mod
from negspace_orchestrator.driver import Orchestrator, run_target
from negspace_orchestrator.services import Dependencies, DependencyDown
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import RunRow, Store

log = logging.getLogger("negspace.orchestrator")
SERVICE = "orchestrator"
KEEPALIVE_S = 15.0
NDJSON_BATCH = 500  # rows per store query while streaming instructions or Q/A records


def get_orch(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


Orch = Annotated[Orchestrator, Depends(get_orch)]


def _run_or_404(orch: Orchestrator, run_id: str) -> RunRow:
    run = orch.store.get_run(run_id)
    if run is None:
        raise NotFoundError(f"no run with id {run_id!r} (GET /runs lists them)", param="run_id")
    return run


def _to_wire(orch: Orchestrator, run: RunRow) -> Run:
    return Run(id=run.id, status=run.status, mode=run.mode, config=run.config,  # type: ignore[arg-type]
               progress=orch.progress(run), error=run.error, created_at=run.created,
               updated_at=run.updated, collection=run.collection, train_job_id=run.train_job_id)


def _target_for(orch: Orchestrator, config: RunConfig) -> int:
    if config.mode == "guided":
        return run_target(config)
    if config.size is not None:
        return config.size
    match = orch.store.get_run(config.match_run or "")
    if match is None:
        raise BadRequestError(f"match_run {config.match_run!r} is not a known run id", param="match_run")
    if match.mode != "guided":
        raise BadRequestError(f"match_run {config.match_run!r} is a baseline; give a guided run's id",
                              param="match_run")
    if match.status in TERMINAL_RUN_STATUSES:
        accepted = orch.store.counts(match.id)[0]
        if accepted == 0:
            raise BadRequestError(f"run {match.id} ended ({match.status}) with no instructions to match",
                                  param="match_run")
        return accepted
    return match.target


runs = APIRouter(prefix="/runs", tags=["runs"])


@runs.post("", status_code=201, response_model=RunCreated)
async def create_run(config: RunConfig, orch: Orch) -> RunCreated:
    target = _target_for(orch, config)
    run = orch.create(config, target)
    return RunCreated(id=run.id, status=run.status)  # type: ignore[arg-type]


@runs.get("", response_model=RunList)
async def list_runs(orch: Orch, status: RunStatus | None = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_RUNS_PAGE_SIZE)] = RUNS_PAGE_SIZE,
                    after: Annotated[str | None, Query(max_length=200)] = None) -> RunList:
    """A page of runs in creation order; pass ``next_after`` as ``?after=`` for the next one."""
    cursor = None
    if after is not None:
        cursor = orch.store.get_run(after)
        if cursor is None:
            raise BadRequestError(f"after={after!r} is not a run id; pass the next_after of the previous page "
                                  "(or leave it out for the first page)", param="after")
    rows = orch.store.list_runs(status, limit=limit + 1, after=cursor)
    page = rows[:limit]
    return RunList(runs=[_to_wire(orch, r) for r in page],
                   next_after=page[-1].id if len(rows) > limit else None)


@runs.get("/{run_id}", response_model=Run)
async def get_run(run_id: str, orch: Orch) -> Run:
    return _to_wire(orch, _run_or_404(orch, run_id))


@runs.post("/{run_id}/cancel", response_model=Run)
async def cancel_run(run_id: str, orch: Orch) -> Run:
    run = _run_or_404(orch, run_id)
    if run.status in ("completed", "failed"):
        raise ConflictError(f"run {run_id} already ended ({run.status}); nothing to cancel")
    if run.status != "cancelled":
        await orch.cancel(run_id)
    return _to_wire(orch, _run_or_404(orch, run_id))


@runs.post("/{run_id}/resume", response_model=Run)
async def resume_run(run_id: str, orch: Orch) -> Run:
    run = _run_or_404(orch, run_id)
    if run.status in ("completed", "cancelled"):
        raise ConflictError(f"run {run_id} is {run.status}; only paused or failed runs can be resumed")
    if run.status in ("paused", "failed"):
        orch.resume(run_id)
    return _to_wire(orch, _run_or_404(orch, run_id))


@runs.get("/{run_id}/instructions", response_class=Response,
          responses={200: {"content": {"application/x-ndjson": {}}}})
async def instructions(run_id: str, orch: Orch) -> Response:
    _run_or_404(orch, run_id)

    async def lines() -> AsyncIterator[str]:
        for batch in orch.store.iter_instructions(run_id, NDJSON_BATCH):
            yield "".join(i.model_dump_json() + "\n" for i in batch)
            await asyncio.sleep(0)  # let the event loop (the drivers) run between batches

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@runs.get("/{run_id}/metrics", response_model=MetricsResponse)
async def metrics(run_id: str, orch: Orch) -> MetricsResponse:
    """Diversity metrics of the run's accepted instructions (its own controller collection)."""
    return await _metrics(orch, run_id, MetricsRequest())


@runs.post("/{run_id}/metrics", response_model=MetricsResponse)
async def metrics_with_basis(run_id: str, request: MetricsRequest, orch: Orch) -> MetricsResponse:
    """The same, with a fixed PCA basis/mean so the hull volumes of two runs compare alike."""
    return await _metrics(orch, run_id, request)


async def _metrics(orch: Orchestrator, run_id: str, request: MetricsRequest) -> MetricsResponse:
    run = _run_or_404(orch, run_id)
    if orch.store.counts(run_id)[0] == 0:
        raise ConflictError(f"run {run_id} has no accepted instructions yet; metrics need at least one")
    try:
        return await orch.deps.controller_call(
            "metrics", lambda c: c.collections.metrics(run.collection, request))
    except DependencyDown as exc:
        raise ServiceUnavailableError(str(exc)) from exc


@runs.get("/{run_id}/events")
async def events(run_id: str, orch: Orch, after: Annotated[int, Query(ge=0)] = 0,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Server-sent events: ``id`` = seq, ``event`` = type, ``data`` = the RunEvent JSON.

    Reconnect with ``?after=<last seq>`` (or ``Last-Event-ID``); the stream ends once the run is
    completed, failed or cancelled and every event so far was sent.
    """
    _run_or_404(orch, run_id)
    if last_event_id and last_event_id.isdigit():
        after = max(after, int(last_event_id))

    async def stream() -> AsyncIterator[str]:
        seq = after
        while True:
            waiter = orch.waiter(run_id)
            run = orch.store.get_run(run_id)
            batch = orch.store.events_after(run_id, seq)
            for ev in batch:
                seq = ev.seq
                yield f"id: {ev.seq}\nevent: {ev.type}\ndata: {ev.model_dump_json()}\n\n"
            if batch:
                continue
            if run is None or run.status in TERMINAL_RUN_STATUSES:
                return
            try:
                await asyncio.wait_for(waiter.wait(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keepalive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@runs.post("/{run_id}/qa", response_model=QAResult)
async def qa(run_id: str, orch: Orch, request: QARequest | None = None) -> QAResult:
    run = _run_or_404(orch, run_id)
    if run.status in ("queued", "running"):
        raise ConflictError(f"run {run_id} is {run.status}; convert it to Q/A once it has finished")
    if orch.store.counts(run_id)[0] == 0:
        raise ConflictError(f"run {run_id} has no accepted instructions to convert")
    if run_id in orch.qa_running:
        raise ConflictError(f"a Q/A conversion of run {run_id} is already in progress")
    orch.qa_running.add(run_id)
    try:
        return await qa_mod.convert(orch, run, request or QARequest())
    except DependencyDown as exc:
        raise ServiceUnavailableError(f"{exc}; converted pairs so far are kept: POST /qa again to continue") from exc
    finally:
        orch.qa_running.discard(run_id)


@runs.get("/{run_id}/qa", response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
async def qa_records(run_id: str, orch: Orch) -> Response:
    _run_or_404(orch, run_id)
    if not orch.store.has_qa_records(run_id):
        raise ConflictError(f"run {run_id} has no Q/A records: POST /runs/{run_id}/qa first")

    async def lines() -> AsyncIterator[str]:
        for batch in orch.store.iter_qa_records(run_id, NDJSON_BATCH):
            yield "".join(qa_mod.chat_record(q, a).model_dump_json() + "\n" for q, a in batch)
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _export_info(orch: Orchestrator, run: RunRow, license: str) -> export_mod.ExportInfo:
    """Everything the dataset card says about the run; the model, embedder and metrics are asked
    of the node and controller, and the card says so when they cannot tell."""
    converted, rejected = orch.store.qa_counts(run.id)
    info = export_mod.ExportInfo(run_id=run.id, mode=run.mode, status=run.status, config=run.config,
                                 attempts=orch.store.counts(run.id)[1], qa_total=converted + rejected,
                                 qa_converted=converted, qa_rejections=orch.store.qa_rejections(run.id),
                                 license=license)
    for node in orch.deps.nodes[:1]:
        try:
            models = await asyncio.wait_for(node.models.list(), timeout=10.0)
            info.model = ", ".join(m.id for m in models.data) or None
        except (NegspaceError, TimeoutError):
            pass
    if orch.deps.controller is not None:
        try:
            health = await asyncio.wait_for(orch.deps.controller.health(), timeout=10.0)
            info.embedder = str(health.info.get("embedder")) if health.info.get("embedder") else None
        except (NegspaceError, TimeoutError):
            pass
    if orch.store.counts(run.id)[0]:
        try:
            info.metrics = (await _metrics(orch, run.id, MetricsRequest())).model_dump(mode="json")
        except (NegspaceError, TimeoutError) as exc:
            info.metrics_note = f"the controller did not answer ({getattr(exc, 'message', exc)})"
    else:
        info.metrics_note = "the run has no instructions"
    return info


def _export_ready(orch: Orchestrator, run_id: str) -> RunRow:
    run = _run_or_404(orch, run_id)
    if run.status in ("queued", "running"):
        raise ConflictError(f"run {run_id} is {run.status}; export it once it has finished")
    if orch.store.counts(run_id)[0] == 0:
        raise ConflictError(f"run {run_id} has no accepted instructions to export")
    return run


async def _write_export(orch: Orchestrator, run: RunRow, fmt: str, out_dir, license: str) -> list:
    info = await _export_info(orch, run, license)
    instructions = export_mod.instruction_rows(orch.store.instructions(run.id))
    pairs = export_mod.qa_rows(orch.store.qa_records(run.id))
    return await asyncio.to_thread(export_mod.write, out_dir, fmt, info, instructions, pairs)


@runs.post("/{run_id}/export", response_model=ExportResult)
async def export(run_id: str, orch: Orch, request: ExportRequest | None = None) -> ExportResult:
    """Write the run's instructions and Q/A pairs with a dataset card (README.md) inside --data-dir."""
    req = request or ExportRequest()
    run = _export_ready(orch, run_id)
    data_dir = orch.settings.exports_dir
    default = f"{run_id}/export-{req.format}"
    try:
        out_dir = await asyncio.to_thread(qa_mod.make_export_dir, data_dir, req.export_dir or default)
        files = await _write_export(orch, run, req.format, out_dir, req.license)
    except OSError as exc:
        raise BadRequestError(f"cannot write the export to {req.export_dir or default!r} under "
                              f"{str(data_dir)!r}: {exc.strerror or exc}", param="export_dir") from exc
    return ExportResult(run_id=run_id, format=req.format, path=str(out_dir), files=[str(f) for f in files],
                        instructions=orch.store.counts(run_id)[0], qa=orch.store.qa_counts(run_id)[0])


@runs.get("/{run_id}/export", response_class=Response, responses={200: {"content": {"application/x-tar": {}}}})
async def export_archive(run_id: str, orch: Orch, format: ExportFormat = "hf",
                         license: Annotated[str, Query(max_length=100)] = "other") -> Response:
    """The same export as a tar archive (the folder's files at its root), for a client elsewhere."""
    import io
    import tarfile
    import tempfile
    from pathlib import Path

    run = _export_ready(orch, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        await _write_export(orch, run, format, Path(tmp), license)

        def pack() -> bytes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for f in sorted(Path(tmp).rglob("*")):
                    if f.is_file():
                        tar.add(f, arcname=str(f.relative_to(tmp)))
            return buf.getvalue()

        body = await asyncio.to_thread(pack)
    return Response(body, media_type="application/x-tar",
                    headers={"Content-Disposition": f'attachment; filename="{run_id}-{format}.tar"'})


def _trainer(orch: Orchestrator):
    if orch.deps.trainer is None:
        raise ServiceUnavailableError("the orchestrator was started without --trainer-url")
    return orch.deps.trainer


SeedParam = Annotated[int | None, Query(ge=0, description="A training seed: one job per (run, seed), "
                                                          "beside the run's own job; the request's "
                                                          "training.seed is set to it.")]


@runs.post("/{run_id}/train", status_code=201, response_model=Job)
async def train(run_id: str, orch: Orch, request: TrainRequest | None = None, seed: SeedParam = None) -> Job:
    # One request per run at a time: the check (does the run have an active job?) and the create
    # must not interleave, or two concurrent requests could each find no job and create one. A
    # request that waited while another one created the run's job gets a 409 naming that job.
    seen = _run_or_404(orch, run_id).train_job_id
    async with orch.train_lock(run_id):
        return await _train(run_id, orch, request, seed, seen)


async def _train(run_id: str, orch: Orchestrator, request: TrainRequest | None, seed: int | None,
                 seen_job: str | None) -> Job:
    run = _run_or_404(orch, run_id)
    if seed is None and run.train_job_id and run.train_job_id != seen_job:
        raise ConflictError(f"run {run_id} got training job {run.train_job_id} from a concurrent POST "
                            f"/runs/{run_id}/train; follow it with GET /runs/{run_id}/train")
    trainer = _trainer(orch)
    pairs = orch.store.qa_records(run_id)
    if not pairs:
        raise ConflictError(f"run {run_id} has no Q/A records: POST /runs/{run_id}/qa first")
    if seed is not None:
        return await _train_seed(orch, trainer, run_id, pairs, request or TrainRequest(), seed)
    if run.train_job_id:
        try:
            async with _trainer_errors():
                current = await trainer.jobs.get(run.train_job_id)
        except NotFoundError:
            current = None
        if current is not None and current.status not in TERMINAL_JOB_STATUSES:
            raise ConflictError(f"run {run_id} already has training job {current.id} ({current.status})")
    req = request or TrainRequest()
    job_request = JobRequest(dataset=DatasetSpec(records=[qa_mod.chat_record(q, a) for q, a in pairs]),
                             base_model=req.base_model, method=req.method, lora=req.lora,
                             training=req.training, eval=req.eval, compare_base=req.compare_base,
                             name=f"negspace-run-{run_id}")
    created = await _create_train_job(orch, trainer, run_id, job_request)
    try:
        async with _trainer_errors():
            job = await trainer.jobs.get(created.id)
    except ServiceUnavailableError:  # the job exists: record it and answer with what we know
        job = Job(id=created.id, status=created.status, name=job_request.name, request=job_request)
    _record_train_job(orch, run_id, job.id, job.status)
    return job


async def _train_seed(orch: Orchestrator, trainer, run_id: str, pairs, req: TrainRequest, seed: int) -> Job:
    """The run's job for ``seed``: created once (a stored idempotency key, sent with every try),
    then answered as the trainer reports it, however often the request is repeated."""
    key, job_id = orch.store.seed_train_key(run_id, seed)
    if job_id is None:
        job_request = JobRequest(dataset=DatasetSpec(records=[qa_mod.chat_record(q, a) for q, a in pairs]),
                                 base_model=req.base_model, method=req.method, lora=req.lora,
                                 training=req.training.model_copy(update={"seed": seed}), eval=req.eval,
                                 compare_base=req.compare_base, name=f"negspace-run-{run_id}-seed-{seed}")
        async with _trainer_errors():
            created = await trainer.jobs.create(job_request, idempotency_key=key)
        job_id = created.id
        orch.store.set_seed_train_job(run_id, seed, job_id)
        orch.event(run_id, "train", {"job_id": job_id, "status": created.status, "seed": seed})
    async with _trainer_errors():
        return await trainer.jobs.get(job_id)


# Tries of one job creation when the trainer's answer is lost (timeout, dropped connection) or
# it is briefly unavailable: safe because every try sends the run's same idempotency key.
TRAIN_CREATE_TRIES = 3


async def _create_train_job(orch: Orchestrator, trainer, run_id: str, job_request: JobRequest):
    """Create the run's training job on the trainer exactly once, however often this is retried
    (here, or by a client retrying POST /runs/{id}/train after a timeout): the key is stored on
    the run before the first call and sent with every try until a job is recorded."""
    key = orch.store.train_key(run_id)
    last: NegspaceError | None = None
    for tries in range(TRAIN_CREATE_TRIES):
        if tries:
            await asyncio.sleep(min(orch.settings.retry_max_backoff_s,
                                    orch.settings.retry_backoff_s * 2 ** (tries - 1)))
        try:
            return await trainer.jobs.create(job_request, idempotency_key=key)
        except ConflictError as exc:
            if exc.param != "idempotency_key":
                raise
            # An earlier POST /runs/{id}/train, whose answer was lost, created a job with other
            # settings under this key: that job is the run's.
            key = await _adopt_earlier_job(orch, trainer, run_id, key)
        except NegspaceError as exc:
            if not is_retryable(exc) or exc.status_code == 429:  # a full queue: retrying now won't help
                ours = _as_ours(exc)
                if ours is exc:
                    raise
                raise ours from exc
            last = exc
            log.warning("run %s: creating the training job failed (try %d/%d, idempotency key %s): %s",
                        run_id, tries + 1, TRAIN_CREATE_TRIES, key, exc.message)
    assert last is not None
    raise ServiceUnavailableError(
        f"trainer: {last.message} (tried {TRAIN_CREATE_TRIES} times with idempotency key {key}; the "
        f"trainer may have created the job: retrying POST /runs/{run_id}/train sends the same key, "
        "so it cannot start a second one)") from last


async def _adopt_earlier_job(orch: Orchestrator, trainer, run_id: str, key: str) -> str:
    """Record the job an earlier, lost create made under ``key``; 409 while it is active, else
    the new key to create this request's job with."""
    async with _trainer_errors():
        found = (await trainer.jobs.list(idempotency_key=key)).jobs
    if not found:
        raise ServiceUnavailableError(f"trainer: it refused idempotency key {key} as used, yet lists "
                                      "no job for it; retry in a moment")
    earlier = found[0]
    _record_train_job(orch, run_id, earlier.id, earlier.status)
    if earlier.status not in TERMINAL_JOB_STATUSES:
        raise ConflictError(f"run {run_id} already has training job {earlier.id} ({earlier.status}), "
                            "created by an earlier POST /runs/{id}/train whose answer was lost, with "
                            "other settings; wait for it or cancel it on the trainer, then train again")
    return orch.store.train_key(run_id)  # it finished: this request's job gets a new key


def _record_train_job(orch: Orchestrator, run_id: str, job_id: str, status: str) -> None:
    """The run's training job (once, however many retries reported it), followed for train events."""
    run = orch.store.get_run(run_id)
    if run is not None and run.train_job_id == job_id:
        return
    orch.store.set_train_job(run_id, job_id)
    orch.event(run_id, "train", {"job_id": job_id, "status": status})
    orch.track_train_job(run_id, job_id)


@runs.get("/{run_id}/train", response_model=Job)
async def train_status(run_id: str, orch: Orch, seed: SeedParam = None) -> Job:
    run = _run_or_404(orch, run_id)
    if seed is not None:
        job_id = orch.store.seed_train_jobs(run_id).get(seed)
        if job_id is None:
            raise NotFoundError(f"run {run_id} has no training job for seed {seed}: "
                                f"POST /runs/{run_id}/train?seed={seed} first")
        async with _trainer_errors():
            return await _trainer(orch).jobs.get(job_id)
    if not run.train_job_id:
        raise NotFoundError(f"run {run_id} has no training job: POST /runs/{run_id}/train first")
    async with _trainer_errors():
        return await _trainer(orch).jobs.get(run.train_job_id)


@asynccontextmanager
async def _trainer_errors():
    """A trainer that cannot be reached is a 503 of ours (not the client-side 598/599 codes)."""
    try:
        yield
    except NegspaceError as exc:
        ours = _as_ours(exc)
        if ours is exc:
            raise
        raise ours from exc


def _as_ours(exc: NegspaceError) -> NegspaceError:
    if is_retryable(exc) or exc.status_code >= 500:
        return ServiceUnavailableError(f"trainer: {exc.message}")
    return exc


def create_app(settings: OrchestratorSettings, deps: Dependencies | None = None) -> FastAPI:
    """The orchestrator app. ``deps`` lets tests inject clients bound to in-process mock services."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.db_path)
        d = deps or Dependencies(settings)
        orch = Orchestrator(settings, store, d)
        app.state.orchestrator = orch
        await orch.start()
        try:
            yield
        finally:
            await orch.stop()
            if deps is None:
                await d.aclose()
            store.close()

    app = servekit_app(service=SERVICE, settings=settings, title="negspace orchestrator",
                       description="Guided and baseline instruction generation runs, Q/A conversion, "
                                   "training hand-off.", lifespan=lifespan)
    app.include_router(runs)

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> JSONResponse:
        orch: Orchestrator = request.app.state.orchestrator
        deps_state = await orch.deps.check()
        return health_response(SERVICE, "ok", runs=orch.store.status_counts(), dependencies=deps_state,
                               round_mode=settings.round_mode, db=str(settings.db_path),
                               max_active_runs=settings.max_active_runs,
                               max_queued_runs=settings.max_queued_runs,
                               queued_runs_held_because=orch.waiting_for)

    return app
