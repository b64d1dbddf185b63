from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from fastapi import FastAPI
from negspace_contracts.trainer import TrainerClient
from negspace_servekit.testing import in_process
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


async def wait_first_step(client, job_id, timeout=300.0):
    """Poll GET /jobs/{id} until the job has taken its first training step (the worker loaded the
    model and trains); fail if it ends first or ``timeout`` passes. Returns the job."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (job := await client.jobs.get(job_id)).progress.step < 1:
        assert job.status in ("queued", "running") and loop.time() < end, job
        await asyncio.sleep(0.2)
    return job


@pytest.fixture
def wait_job():
    return wait_for


@pytest.fixture
def wait_training():
    return wait_first_step


class Service:
    def __init__(self, app: FastAPI, client: TrainerClient) -> None:
        self.app, self.client = app, client

    @property
    def runner(self):
        return self.app.state.trainer.runner


@pytest.fixture
async def service(tmp_path):
    """``await service(...)``: a trainer app in-process (lifespan running) with a TrainerClient on it;
    each one made is shut down after the test, the last made first."""
    async with contextlib.AsyncExitStack() as made:
        async def make(start_worker=True, worker_command=None, **settings):
            s = TrainerSettings(workdir=tmp_path / "trainer", poll_interval_s=0.2, cancel_grace_s=5, **settings)
            app = create_app(s, start_worker=start_worker, worker_command=worker_command)
            client = await made.enter_async_context(in_process(app, "http://trainer", client=TrainerClient))
            return Service(app, client)

        yield make
