from __future__ import annotations

import os
from contextlib import asynccontextmanager

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negspace_contracts.controller import ControllerClient  # noqa: E402
from negspace_controller.app import create_app  # noqa: E402
from negspace_controller.settings import ControllerSettings  # noqa: E402


@asynccontextmanager
async def running(settings: ControllerSettings | None = None, **kw):
    """The real app with its lifespan, and the typed client plus a raw httpx client on it."""
    app = create_app(settings or ControllerSettings(qdrant_path=":memory:"), **kw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with ControllerClient("http://controller", transport=transport) as client, \
                httpx.AsyncClient(base_url="http://controller", transport=transport) as raw:
            yield app, client, raw


@pytest.fixture
def run_app():
    """``async with run_app(settings, embedder=...) as (app, client, raw)``."""
    return running
