"""``build_store(settings)``: the one place the settings choose a store engine (as qdrant-client
chooses local or remote once), importing only the chosen engine's module: a Qdrant server with
--qdrant-url (``store_qdrant.ServerStore``); else the embedded engine ``choose_engine`` picks for
the folder: edge (``store_edge.EdgeStore``, the default) or qdrant-client's local mode
(``store_qdrant.LocalStore``) for a folder that already holds a local-mode store."""

from __future__ import annotations

import logging
from pathlib import Path

from negspace_controller.settings import ControllerSettings
from negspace_controller.store import Store, is_edge_folder, is_local_mode_folder

log = logging.getLogger("negspace.controller")


def build_store(settings: ControllerSettings) -> Store:
    if settings.qdrant_url:
        from negspace_controller.store_qdrant import ServerStore

        if settings.qdrant_engine:
            log.info("--qdrant-engine %s is ignored: --qdrant-url %s is a Qdrant server",
                     settings.qdrant_engine, settings.qdrant_url)
        return ServerStore(settings.qdrant_url, api_key=settings.qdrant_api_key, prefix=settings.collection_prefix,
                           timeout=settings.qdrant_timeout_s, collection_params=settings.collection_params())
    path = settings.resolved_qdrant_path()
    if choose_engine(path, settings.qdrant_engine) == "edge":
        from negspace_controller.store_edge import EdgeStore

        return EdgeStore(path, prefix=settings.collection_prefix, flush_interval_s=settings.qdrant_flush_interval_s)
    from negspace_controller.store_qdrant import LocalStore

    if path != ":memory:":
        Path(path).mkdir(parents=True, exist_ok=True)
    return LocalStore(path, prefix=settings.collection_prefix)


def choose_engine(path: str, requested: str | None) -> str:
    """Which embedded engine opens ``path``: ``requested`` when given and it fits the folder, else
    what the folder holds (a qdrant-client local-mode store keeps local mode, with one log line
    on how to migrate; an empty or new folder gets edge). A request that contradicts what the
    folder holds is refused: opening it would hide the collections it has."""
    if requested not in (None, "edge", "local"):
        raise ValueError(f"qdrant engine must be 'edge' or 'local', not {requested!r}")
    if path == ":memory:":
        return requested or "edge"
    if is_local_mode_folder(path):
        if requested == "edge":
            raise ValueError(f"--qdrant-engine edge: {path} holds a qdrant-client local-mode store. Migrate it "
                             f"first (python -m negspace_controller.migrate_store {path}), or run with "
                             "--qdrant-engine local")
        if requested is None:
            log.warning("%s holds a qdrant-client local-mode store: opening it in local mode (slow: ~50 ms "
                        "per write at 20k points). To move it to the edge engine, stop the controller and "
                        "run: python -m negspace_controller.migrate_store %s", path, path)
        return "local"
    if requested == "local" and is_edge_folder(path):
        raise ValueError(f"--qdrant-engine local: {path} holds edge collections, which local mode cannot "
                         "read; run with --qdrant-engine edge (the default) or use another --qdrant-path")
    return requested or "edge"
