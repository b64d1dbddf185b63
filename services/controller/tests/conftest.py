from __future__ import annotations

import os
from contextlib import asynccontextmanager

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negspace_contracts.controller import ControllerClient  # noqa: E402
from negspace_controller.app import create_app  # noqa: E402
from negspace_controller.settings import ControllerSettings  # noqa: E402
from negspace_servekit.testing import asgi_client, lifespan  # noqa: E402


@asynccontextmanager
async def running(settings: ControllerSettings | None = None, **kw):
    """The real app with its lifespan, and the typed client plus a raw httpx client on it."""
    app = create_app(settings or ControllerSettings(qdrant_path=":memory:"), **kw)
    async with lifespan(app), asgi_client(app, "http://controller") as raw, \
            ControllerClient("http://controller", transport=httpx.ASGITransport(app=app)) as client:
        yield app, client, raw


@pytest.fixture
def run_app():
    """``async with run_app(settings, embedder=...) as (app, client, raw)``."""
    return running
