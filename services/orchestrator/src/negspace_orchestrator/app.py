"""The orchestrator's app factory: the ``Orchestrator`` built in the lifespan, and the routers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from negspace_servekit import create_app as servekit_app

from negspace_orchestrator.api import datasets, health, runs, train
from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.serving import Orchestrator
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import Store

SERVICE = "orchestrator"


def create_app(settings: OrchestratorSettings, deps: Dependencies | None = None) -> FastAPI:
    """The orchestrator app. ``deps`` lets tests inject clients bound to in-process mock services."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.db_path)
        d = deps or Dependencies(settings)
        orch = Orchestrator(settings, store, d)
        app.state.orchestrator = orch
        try:
            await orch.start()  # refuses to start when a run's controller is unknown (see Scheduler)
        except BaseException:
            await orch.stop()
            if deps is None:
                await d.aclose()
            store.close()
            raise
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
    for routes in (runs, datasets, train, health):
        app.include_router(routes.router)
    return app
