"""The engine's lifecycle inside the node process: start it in the background (a failure is kept
for ``/health``, never lost), and watch for its death so that the process exits for its supervisor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from negspace_node.engines.base import Engine

log = logging.getLogger("negspace.node")


async def start(engine: Engine) -> None:
    try:
        await engine.start()
    except Exception as exc:  # noqa: BLE001 - never let a start failure vanish: /health reports it
        log.exception("engine %s failed to start", engine.name)
        engine.fail(f"start failed: {type(exc).__name__}: {exc}")


async def watch(engine: Engine, on_engine_dead: Callable[[str], None], grace_s: float) -> None:
    """Wait for the engine to fail (at start or later), give /health and the waiting requests
    ``grace_s`` to report it, then call ``on_engine_dead(reason)`` (the process exits)."""
    while engine.state != "error":
        await asyncio.sleep(0.2)
    reason = engine.error or "unknown"
    log.critical("engine %s is dead (%s): the node exits in %.1f s so that its supervisor restarts it",
                 engine.name, reason, grace_s)
    await asyncio.sleep(grace_s)
    on_engine_dead(reason)
