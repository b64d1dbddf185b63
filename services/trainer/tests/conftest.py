"""Helpers: the real trainer app in-process (httpx.ASGITransport) with a typed client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import httpx
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES, Job, TrainerClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARITH = [(a, b) for a in range(3, 15) for b in (2, 5)]


def chat_records(n: int) -> list[dict]:
    """Short arithmetic Q/A chats (the shape the orchestrator sends)."""
    out = []
    for a, b in ARITH[:n]:
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


@contextlib.asynccontextmanager
async def running_app(app):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with TrainerClient("http://trainer", transport=transport, timeout=60) as client:
            yield client


async def wait_for(client: TrainerClient, job_id: str, predicate, timeout_s: float = 600.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await client.jobs.get(job_id)
        if predicate(job):
            return job
        if job.status in TERMINAL_JOB_STATUSES or time.monotonic() > deadline:
            logs = await client.jobs.logs(job_id)
            raise AssertionError(f"job {job_id} is {job.status} ({job.error}); waited for another state\n"
                                 f"{logs[-4000:]}")
        await asyncio.sleep(0.3)


async def wait_done(client: TrainerClient, job_id: str, timeout_s: float = 600.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await client.jobs.get(job_id)
        if job.status in TERMINAL_JOB_STATUSES:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout_s} s"
        await asyncio.sleep(0.3)


def workdir(tmp: Path) -> Path:
    return tmp / "trainer"
