"""The trainer's rules behind the routes: one ``Trainer`` that owns the job runner's lifetime and
answers the requests (jobs, their logs and artifacts, the shipped tasks, health)."""

from __future__ import annotations

from collections.abc import Callable

from negspace_contracts.trainer import ArtifactList, Job, JobList, JobRequest, LocalTask, TaskList
from prometheus_client import CollectorRegistry, Counter, Gauge

from negspace_trainer import local_tasks
from negspace_trainer.runner import JobRunner
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore


class Trainer:
    """The runner (queue, worker processes, job records) and the shipped tasks' folder, for one
    lifespan. ``runner`` injected (tests) is started and stopped here but its store is its owner's;
    ``on_finish(status)`` is called for each job that ends (the jobs-finished counter)."""

    def __init__(self, settings: TrainerSettings, runner: JobRunner | None = None, *,
                 start_worker: bool = True, worker_command=None,
                 on_finish: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        workdir = settings.resolved_workdir
        self.tasks_dir = local_tasks.materialize(workdir / "tasks")
        if not settings.dataset_dirs:  # the default place for dataset files: make it exist
            settings.allowed_dataset_dirs[0].mkdir(parents=True, exist_ok=True)
        self._owns_runner = runner is None
        self.runner = runner or JobRunner(settings, JobStore(workdir / "jobs.sqlite"),
                                          start_worker=start_worker, worker_command=worker_command)
        self.runner.on_finish = on_finish

    async def start(self) -> None:
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        if self._owns_runner:
            self.runner.store.close()

    # ---- jobs ------------------------------------------------------------------------------------
    async def create(self, body: JobRequest) -> tuple[Job, bool]:
        """The job and whether it was a replay of an earlier request with the same idempotency key."""
        return await self.runner.create(body)

    def list_jobs(self, idempotency_key: str | None = None) -> JobList:
        """Every job; with ``idempotency_key`` only the job created with it (an empty list if none was)."""
        if idempotency_key is not None:
            found = self.runner.store.by_key(idempotency_key)
            return JobList(jobs=[self.runner.get(found[0])] if found else [])
        return JobList(jobs=self.runner.store.list())

    def get(self, job_id: str) -> Job:
        return self.runner.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        return await self.runner.cancel(job_id)

    def logs(self, job_id: str, tail: int | None = None) -> str:
        return self.runner.logs(job_id, tail)

    def artifacts(self, job_id: str) -> ArtifactList:
        return self.runner.artifacts(job_id)

    # ---- tasks, health, metrics --------------------------------------------------------------------
    def tasks(self) -> TaskList:
        include = str(self.tasks_dir)
        return TaskList(tasks=[LocalTask(name=t.name, description=t.description, num_docs=t.num_docs,
                                         include_path=include) for t in local_tasks.shipped_tasks()])

    def health(self) -> dict:
        return {"running": self.runner.busy, "queued": self.queued(),
                "workdir": str(self.settings.resolved_workdir)}

    def queued(self) -> int:
        return self.runner.store.count("queued")


def register_metrics(registry: CollectorRegistry, live: Callable[[], Trainer | None]) -> Counter:
    """The trainer's Prometheus series, registered once per app (not per lifespan start, which
    would register them twice): the gauges read whichever ``Trainer`` is ``live()``; the returned
    jobs-finished counter (by status) is what each ``Trainer``'s ``on_finish`` increments."""
    finished = Counter("negspace_trainer_jobs_finished", "Jobs finished, by status", ["status"],
                       registry=registry)
    Gauge("negspace_trainer_jobs_queued", "Jobs waiting", registry=registry).set_function(
        lambda: t.queued() if (t := live()) is not None else 0)
    Gauge("negspace_trainer_jobs_running", "Jobs running", registry=registry).set_function(
        lambda: 1 if (t := live()) is not None and t.runner.busy else 0)
    return finished
