"""The node's app factory: ``create_app(settings, engine=None)``.

Without ``engine`` the factory builds the one ``settings.engine`` names (default: vllm when
importable, else transformers) but does not load it: the lifespan starts loading in the
background, so ``/health`` answers 503 "loading" (with what it is doing) until the model is
ready, and 503 "error" with the reason if loading fails. An injected engine (tests,
``FakeEngine``) is started by the lifespan only if it is still loading, and is not stopped on
shutdown: its owner stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from negspace_servekit import create_app as create_service_app

from negspace_node.api import health_router, openai_router
from negspace_node.engines import default_engine_name, get_engine
from negspace_node.engines.base import Engine
from negspace_node.serving import NodeService
from negspace_node.settings import NodeSettings

log = logging.getLogger("negspace.node")


async def _start(engine: Engine) -> None:
    try:
        await engine.start()
    except Exception as exc:  # noqa: BLE001 - never let a start failure vanish: /health reports it
        log.exception("engine %s failed to start", engine.name)
        engine.fail(f"start failed: {type(exc).__name__}: {exc}")


def create_app(settings: NodeSettings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or NodeSettings()
    owned = engine is None
    if engine is None:
        engine = get_engine(settings.engine or default_engine_name(), settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(engine)) if engine.state == "loading" else None
        app.state.engine_task = task
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if owned:
                await engine.stop()

    app = create_service_app(service="node", settings=settings, title="negspace node",
                             description="OpenAI-compatible generation with multi-negative "
                                         "classifier-free guidance", lifespan=lifespan)
    app.state.engine = engine
    app.state.engine_task = None
    app.state.node = NodeService(settings, engine, app.state.metrics_registry)
    app.include_router(health_router)
    app.include_router(openai_router)
    return app
