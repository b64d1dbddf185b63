"""Training hand-off and job tracking: a run's Q/A records become trainer jobs (each created exactly
once, however often a request is retried), and every job is followed for the run's ``train`` events."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from negspace_contracts.errors import (
    ConflictError,
    NegspaceError,
    NotFoundError,
    ServiceUnavailableError,
    is_retryable,
)
from negspace_contracts.orchestrator import LOST_JOB, TRAIN_FIELDS, TrainData, TrainEvent, TrainRequest
from negspace_contracts.trainer import (
    TERMINAL_JOB_STATUSES,
    ChatRecord,
    DatasetSpec,
    Job,
    JobRequest,
    TrainerClient,
)

from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.events import EventLog
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.shared import SharedState
from negspace_orchestrator.store import Store

log = logging.getLogger("negspace.orchestrator")

# Tries of one job creation when the trainer's answer is lost (timeout, dropped connection) or
# it is briefly unavailable: safe because every try sends the run's same idempotency key.
TRAIN_CREATE_TRIES = 3


@asynccontextmanager
async def trainer_errors():
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


class Training(SharedState):
    """``train``/``status`` for the routes; ``start``/``stop`` follow the jobs across restarts."""

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies,
                 events: EventLog) -> None:
        super().__init__(settings, store, deps, events)
        self._locks: dict[str, asyncio.Lock] = {}
        self.followers: dict[str, asyncio.Task] = {}  # run id -> the task following its job
        self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """After a restart: follow every run's training job whose last ``train`` event was not final."""
        self._stopping = False
        if self.deps.trainer is None:
            return
        for run_id, job_id in self.store.train_jobs():
            last = self.store.last_event(run_id, "train")
            if isinstance(last, TrainEvent) and last.data.job_id == job_id and (
                    last.data.status in TERMINAL_JOB_STATUSES or last.data.status == LOST_JOB):
                continue
            log.info("following training job %s of run %s again", job_id, run_id)
            self.track(run_id, job_id)

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self.followers.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.followers.clear()

    # ---- the hand-off ------------------------------------------------------------------------
    def trainer(self) -> TrainerClient:
        if self.deps.trainer is None:
            raise ServiceUnavailableError("the orchestrator was started without --trainer-url")
        return self.deps.trainer

    async def train(self, run_id: str, request: TrainRequest | None, seed: int | None,
                    seen_job: str | None) -> Job:
        """The run's job (or its job for ``seed``). One request per run at a time: the check (does the
        run have an active job?) and the create must not interleave, or two concurrent requests could
        each find no job and create one. A request that waited while another one created the run's
        job (``seen_job``: the run's job when the request came) gets a 409 naming that job."""
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            return await self._train(run_id, request, seed, seen_job)

    async def _train(self, run_id: str, request: TrainRequest | None, seed: int | None,
                     seen_job: str | None) -> Job:
        run = self.store.get_run(run_id)
        assert run is not None  # the route checked it; runs are never deleted
        if seed is None and run.train_job_id and run.train_job_id != seen_job:
            raise ConflictError(f"run {run_id} got training job {run.train_job_id} from a concurrent POST "
                                f"/runs/{run_id}/train; follow it with GET /runs/{run_id}/train")
        trainer = self.trainer()
        records = self.store.qa_records(run_id)
        if not records:
            raise ConflictError(f"run {run_id} has no Q/A records: POST /runs/{run_id}/qa first")
        req = request or TrainRequest()
        if seed is not None:
            return await self._train_seed(trainer, run_id, records, req, seed)
        if run.train_job_id:
            try:
                async with trainer_errors():
                    current = await trainer.jobs.get(run.train_job_id)
            except NotFoundError:
                current = None
            if current is not None and current.status not in TERMINAL_JOB_STATUSES:
                raise ConflictError(f"run {run_id} already has training job {current.id} ({current.status})")
        job_request = self._job_request(req, records, name=f"negspace-run-{run_id}")
        created = await self._create_job(trainer, run_id, job_request)
        try:
            async with trainer_errors():
                job = await trainer.jobs.get(created.id)
        except ServiceUnavailableError:  # the job exists: record it and answer with what we know
            job = Job(id=created.id, status=created.status, name=job_request.name, request=job_request)
        self._record_job(run_id, job.id, job.status)
        return job

    @staticmethod
    def _job_request(req: TrainRequest, records: list[ChatRecord], *, name: str) -> JobRequest:
        return JobRequest(dataset=DatasetSpec(records=records), name=name,
                          **{k: getattr(req, k) for k in TRAIN_FIELDS})

    async def _train_seed(self, trainer: TrainerClient, run_id: str, records: list[ChatRecord], req: TrainRequest,
                          seed: int) -> Job:
        """The run's job for ``seed``: created once (a stored idempotency key, sent with every try),
        then answered as the trainer reports it, however often the request is repeated."""
        key, job_id = self.store.seed_train_key(run_id, seed)
        if job_id is None:
            seeded = req.model_copy(update={"training": req.training.model_copy(update={"seed": seed})})
            job_request = self._job_request(seeded, records, name=f"negspace-run-{run_id}-seed-{seed}")
            async with trainer_errors():
                created = await trainer.jobs.create(job_request, idempotency_key=key)
            job_id = created.id
            self.store.set_seed_train_job(run_id, seed, job_id)
            self.events.emit(run_id, TrainData(job_id=job_id, status=created.status, seed=seed))
        async with trainer_errors():
            return await trainer.jobs.get(job_id)

    async def _create_job(self, trainer: TrainerClient, run_id: str, job_request: JobRequest):
        """Create the run's training job on the trainer exactly once, however often this is retried
        (here, or by a client retrying POST /runs/{id}/train after a timeout): the key is stored on
        the run before the first call and sent with every try until a job is recorded."""
        key = self.store.train_key(run_id)
        last: NegspaceError | None = None
        for tries in range(TRAIN_CREATE_TRIES):
            if tries:
                await asyncio.sleep(min(self.settings.retry_max_backoff_s,
                                        self.settings.retry_backoff_s * 2 ** (tries - 1)))
            try:
                return await trainer.jobs.create(job_request, idempotency_key=key)
            except ConflictError as exc:
                if exc.param != "idempotency_key":
                    raise
                # An earlier POST /runs/{id}/train, whose answer was lost, created a job with other
                # settings under this key: that job is the run's.
                key = await self._adopt_earlier_job(trainer, run_id, key)
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

    async def _adopt_earlier_job(self, trainer: TrainerClient, run_id: str, key: str) -> str:
        """Record the job an earlier, lost create made under ``key``; 409 while it is active, else
        the new key to create this request's job with."""
        async with trainer_errors():
            found = (await trainer.jobs.list(idempotency_key=key)).jobs
        if not found:
            raise ServiceUnavailableError(f"trainer: it refused idempotency key {key} as used, yet lists "
                                          "no job for it; retry in a moment")
        earlier = found[0]
        self._record_job(run_id, earlier.id, earlier.status)
        if earlier.status not in TERMINAL_JOB_STATUSES:
            raise ConflictError(f"run {run_id} already has training job {earlier.id} ({earlier.status}), "
                                "created by an earlier POST /runs/{id}/train whose answer was lost, with "
                                "other settings; wait for it or cancel it on the trainer, then train again")
        return self.store.train_key(run_id)  # it finished: this request's job gets a new key

    def _record_job(self, run_id: str, job_id: str, status: str) -> None:
        """The run's training job (once, however many retries reported it), followed for train events."""
        run = self.store.get_run(run_id)
        if run is not None and run.train_job_id == job_id:
            return
        self.store.set_train_job(run_id, job_id)
        self.events.emit(run_id, TrainData(job_id=job_id, status=status))  # type: ignore[arg-type]
        self.track(run_id, job_id)

    async def status(self, run_id: str, seed: int | None) -> Job:
        """The run's job (or its job for ``seed``) as the trainer reports it now."""
        run = self.store.get_run(run_id)
        assert run is not None  # the route checked it
        if seed is not None:
            job_id = self.store.seed_train_jobs(run_id).get(seed)
            if job_id is None:
                raise NotFoundError(f"run {run_id} has no training job for seed {seed}: "
                                    f"POST /runs/{run_id}/train?seed={seed} first")
        elif run.train_job_id:
            job_id = run.train_job_id
        else:
            raise NotFoundError(f"run {run_id} has no training job: POST /runs/{run_id}/train first")
        async with trainer_errors():
            return await self.trainer().jobs.get(job_id)

    # ---- following jobs ----------------------------------------------------------------------
    def track(self, run_id: str, job_id: str) -> None:
        """Follow a run's training job (one follower per run; a newer job replaces the older)."""
        if self.deps.trainer is None or self._stopping:
            return
        old = self.followers.pop(run_id, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._follow(run_id, job_id), name=f"train-{run_id}")
        self.followers[run_id] = task
        task.add_done_callback(lambda t: self.followers.pop(run_id, None) if self.followers.get(run_id) is t
                               else None)

    async def _follow(self, run_id: str, job_id: str) -> None:
        """Poll the trainer job, writing a ``train`` event whenever its status or step changes."""
        last = None
        while True:
            await asyncio.sleep(self.settings.train_poll_s)
            try:
                job = await self.deps.trainer.jobs.get(job_id)  # type: ignore[union-attr]
            except NotFoundError as exc:  # the trainer lost it (e.g. a wiped database): stop following
                self.events.emit(run_id, TrainData(
                    job_id=job_id, status=LOST_JOB, error=f"the trainer does not know job {job_id}: {exc.message}"))
                return
            except Exception as exc:  # the trainer may be restarting or slow: keep following
                log.info("train job %s: %r", job_id, exc)
                continue
            state = (job.status, job.progress.step)
            if state != last:
                last = state
                self.events.emit(run_id, TrainData(job_id=job_id, status=job.status, step=job.progress.step,
                                                   total_steps=job.progress.total_steps, error=job.error))
            if job.status in TERMINAL_JOB_STATUSES:
                return
