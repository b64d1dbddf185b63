from __future__ import annotations

import os

import httpx
import pytest
from fastapi import FastAPI

from negspace_contracts.trainer import TrainerClient
from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Service:
    def __init__(self, app: FastAPI, client: TrainerClient) -> None:
        self.app, self.client = app, client

    @property
    def runner(self):
        return self.app.state.runner


@pytest.fixture
async def service(tmp_path):
    async def make(orchestrator=None, **settings):
        s = TrainerSettings(workdir=tmp_path / "trainer", poll_interval_s=0.2, cancel_grace_s=5, **settings)
        app = create_app(s, orchestrator=orchestrator)
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        client = TrainerClient("http://trainer", transport=httpx.ASGITransport(app=app))
        made.append((ctx, client))
        return Service(app, client)

    made: list = []
    yield make
    for ctx, client in reversed(made):
        await client.aclose()
        await ctx.__aexit__(None, None, None)
