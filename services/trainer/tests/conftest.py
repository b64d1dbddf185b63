from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from fastapi import FastAPI
from negspace_contracts.trainer import TrainerClient
from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def wait_for(client, job_id, statuses, timeout=120.0):
    """Poll GET /jobs/{id} until the job reaches one of ``statuses``; fail with its state and log."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    job = None
    while loop.time() < end:
        job = await client.jobs.get(job_id)
        if job.status in statuses:
            return job
        await asyncio.sleep(0.2)
    logs = await client.jobs.logs(job_id)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}\n{logs[-3000:]}")


@pytest.fixture
def wait_job():
    return wait_for


class Service:
    def __init__(self, app: FastAPI, client: TrainerClient) -> None:
        self.app, self.client = app, client

    @property
    def runner(self):
        return self.app.state.trainer.runner


@pytest.fixture
async def service(tmp_path):
    async def make(start_worker=True, worker_command=None, **settings):
        s = TrainerSettings(workdir=tmp_path / "trainer", poll_interval_s=0.2, cancel_grace_s=5, **settings)
        app = create_app(s, start_worker=start_worker, worker_command=worker_command)
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
