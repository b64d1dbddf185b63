"""The trainer's app factory: the ``Trainer`` built in the lifespan, and the routers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from negspace_servekit import create_app as servekit_app

from negspace_trainer.api import health_router, jobs_router, tasks_router
from negspace_trainer.runner import JobRunner
from negspace_trainer.serving import Trainer, register_metrics
from negspace_trainer.settings import TrainerSettings

SERVICE = "trainer"


def create_app(settings: TrainerSettings | None = None, runner: JobRunner | None = None,
               start_worker: bool = True, worker_command=None) -> FastAPI:
    """``runner`` lets tests inject one;
    ``start_worker=False`` accepts jobs but never runs them (API tests, fuzzing);
    ``worker_command`` replaces ``python -m negspace_trainer.worker`` (tests: a fake worker)."""
    settings = settings or TrainerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        trainer = Trainer(settings, runner, start_worker=start_worker, worker_command=worker_command,
                          on_finish=lambda status: jobs_finished.labels(status).inc())
        await trainer.start()
        app.state.trainer = trainer
        try:
            yield
        finally:
            app.state.trainer = None
            await trainer.stop()

    app = servekit_app(service=SERVICE, settings=settings, title="negspace trainer",
                       description="SFT jobs (TRL + PEFT) evaluated with lm-evaluation-harness",
                       lifespan=lifespan)
    for router in (jobs_router, tasks_router, health_router):
        app.include_router(router)
    jobs_finished = register_metrics(app.state.metrics_registry, lambda: getattr(app.state, "trainer", None))
    return app
