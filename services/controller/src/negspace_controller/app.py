"""App factory: ``create_app(settings, embedder=None, store=None)``; heavy parts built in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from negspace_servekit import create_app as servekit_app
from prometheus_client import Gauge, Histogram

from negspace_controller import __version__, threads
from negspace_controller.api import collections_router, comparisons_router, embeddings_router, health_router
from negspace_controller.api.health import SERVICE
from negspace_controller.embedder import build_embedder
from negspace_controller.embedding import Embedder
from negspace_controller.serving import Controller
from negspace_controller.settings import ControllerSettings
from negspace_controller.store import Store
from negspace_controller.stores import build_store

log = logging.getLogger("negspace.controller")


def create_app(settings: ControllerSettings | None = None, embedder: Embedder | None = None,
               store: Store | None = None) -> FastAPI:
    settings = settings or ControllerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.controller = None
        app.state.load_error = None
        own_store = store is None
        st = None
        warm: asyncio.Task | None = None
        try:
            threads.configure(settings.blas_threads)
            emb = embedder
            if emb is None:
                emb = await asyncio.to_thread(build_embedder, settings.embedder,
                                              batch_size=settings.embed_batch_size, device=settings.device,
                                              backend=settings.embed_backend,
                                              manifest=settings.embed_manifest,
                                              query_instruction=settings.query_instruction,
                                              query_template=settings.query_template)
            elif settings.query_instruction and not emb.query_instruction:
                emb.query_instruction = settings.query_instruction
            st = store or await asyncio.to_thread(build_store, settings)
            app.state.controller = Controller(emb, st, knn_capacity=settings.knn_capacity,
                                              snapshot_dir=settings.resolved_snapshot_dir(),
                                              index_mode=settings.index_mode,
                                              approx_candidates=settings.approx_candidates,
                                              index_mmap=settings.index_mmap,
                                              replica=settings.replica_url, replicas=settings.replica_urls,
                                              observe=lambda stage, s: stages.labels(stage).observe(s))
            warm = asyncio.create_task(app.state.controller.warm_up())
            log.info("controller ready: embedder %s (%d dims, %s), qdrant %s (%s)", emb.name, emb.dimension,
                     emb.backend, st.where, st.engine)
        except Exception as exc:
            app.state.load_error = f"start-up failed: {type(exc).__name__}: {exc}"
            log.exception("controller start-up failed")
        try:
            yield
        finally:
            if warm is not None and not warm.done():
                warm.cancel()
            if app.state.controller is not None:
                try:
                    await asyncio.to_thread(app.state.controller.save_snapshots)
                except Exception:
                    log.exception("could not write the index snapshots (the next start rebuilds)")
            if own_store and st is not None:
                st.close()

    app = servekit_app(service=SERVICE, settings=settings, title="negspace controller", lifespan=lifespan,
                       version=__version__,
                       description="Embeddings in Qdrant, exact dense-region samples, diversity metrics.")
    for router in (collections_router, embeddings_router, comparisons_router, health_router):
        app.include_router(router)

    stages = Histogram("negspace_controller_stage_seconds", "Time per stage of the write path (embed_batch: one "
                       "model call for every waiting request; lock_wait, check, qdrant_write, index_add)",
                       ["stage"], registry=app.state.metrics_registry,
                       buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
    app.state.points_gauge = Gauge("negspace_controller_points", "Points held in memory per collection",
                                   ["collection"], registry=app.state.metrics_registry)

    return app
