"""The node's app factory: ``create_app(settings, engine=None)``.

Without ``engine`` the factory builds the one ``settings.engine`` names (default: vllm when
importable, else transformers) but does not load it: the lifespan starts loading in the
background, so ``/health`` answers 503 "loading" (with what it is doing) until the model is
ready, and 503 "error" with the reason if loading fails or the engine dies. With an
``on_engine_dead`` callback (what ``python -m negspace_node`` passes) a dead engine does not
linger: the callback runs a short grace period after the failure and the process exits with
code 3, for its supervisor to restart it. An injected engine (tests,
``FakeEngine``) is started by the lifespan only if it is still loading, and is not stopped on
shutdown: its owner stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from negspace_servekit import create_app as create_service_app

from negspace_node import lifecycle
from negspace_node.api import health_router, openai_router
from negspace_node.engines import default_engine_name, get_engine
from negspace_node.engines.base import Engine
from negspace_node.serving import NodeService
from negspace_node.settings import NodeSettings


def create_app(settings: NodeSettings | None = None, engine: Engine | None = None,
               on_engine_dead: Callable[[str], None] | None = None) -> FastAPI:
    """``on_engine_dead(reason)``: called once, ``settings.engine_error_grace_s`` after the engine
    failed (``python -m negspace_node`` passes one that exits the process with code 3)."""
    settings = settings or NodeSettings()
    owned = engine is None
    if engine is None:
        engine = get_engine(settings.engine or default_engine_name(), settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(lifecycle.start(engine)) if engine.state == "loading" else None
        app.state.engine_task = task
        watchdog = (asyncio.create_task(lifecycle.watch(engine, on_engine_dead, settings.engine_error_grace_s))
                    if on_engine_dead is not None else None)
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
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
