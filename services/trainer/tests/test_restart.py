"""Restarts: jobs interrupted by the trainer stopping (crash, SIGKILL, graceful shutdown) are
queued again and run; the lifespan can start twice; the queue limit. A fake worker command stands
in for the real one (no model is loaded here); test_real_job.py restarts a real training job."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from negspace_contracts.errors import RateLimitError
from negspace_contracts.trainer import JobRequest, TrainerClient
from negspace_servekit.testing import in_process
from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore

FAKE = str(Path(__file__).with_name("fake_worker.py"))
FAKE_CMD = [sys.executable, FAKE]
RECORD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def request() -> JobRequest:
    return JobRequest.model_validate({"dataset": {"records": [RECORD]}, "training": {"max_steps": 2}})


def seed_job(store: JobStore, workdir: Path, job_id: str, status: str, attempt: int = 1,
             files: dict[str, str] | None = None) -> Path:
    """A job as a previous service process left it: its row and its folder."""
    store.create(job_id, request())
    store.update(job_id, status=status, attempt=attempt, pid=os.getpid(),  # a pid since reused
                 started_at="2024-01-01T00:00:00+00:00" if status == "running" else None)
    job_dir = workdir / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "request.json").write_text(request().model_dump_json())
    (job_dir / "dataset.jsonl").write_text(json.dumps(RECORD) + "\n")
    (job_dir / "worker.log").write_text("attempt 1 output\n")
    for name, text in (files or {}).items():
        path = job_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return job_dir


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_crash_requeues_the_running_job_ahead_of_later_ones(service, wait_job, tmp_path, monkeypatch):
    order = tmp_path / "order.txt"
    monkeypatch.setenv("FAKE_WORKER_ORDER", str(order))
    workdir = tmp_path / "trainer"
    store = JobStore(workdir / "jobs.sqlite")
    crashed = seed_job(store, workdir, "crashed", "running", files={
        "progress.json": '{"step": 7}', "adapter/adapter_model.safetensors": "partial", "checkpoints/x": "partial"})
    seed_job(store, workdir, "later", "queued")
    store.close()
    # the worker the killed service left behind, still running (its own process group)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", FAKE, str(crashed)],
                              start_new_session=True)
    try:
        svc = await service(worker_command=FAKE_CMD)
        assert orphan.wait(timeout=10) == -9  # ended by the restart; the reused pid (ours) was not
        first = await wait_job(svc.client, "crashed", {"succeeded", "failed"}, timeout=60)
        second = await wait_job(svc.client, "later", {"succeeded", "failed"}, timeout=60)
    finally:
        if orphan.poll() is None:
            orphan.kill()
    assert (first.status, first.attempt, second.status, second.attempt) == ("succeeded", 2, "succeeded", 1)
    assert order.read_text().split() == ["crashed", "later"]  # it kept its place in the queue
    assert [p.loss for p in first.losses] == [1.5, 1.0]  # the new attempt's, not the lost one's
    assert not (crashed / "adapter").exists() and not (crashed / "checkpoints").exists()
    log = await svc.client.jobs.logs("crashed")
    assert "attempt 1 output" in log  # the lost attempt's log is kept, then says what happened
    assert "attempt 1 of 3 interrupted: the trainer stopped (crashed or was killed)" in log
    assert "requeued as attempt 2" in log and "attempt 2 of 3 starting" in log
    assert log.index("requeued") < log.index("fake worker: succeeded")
    assert [j.id for j in (await svc.client.jobs.list()).jobs] == ["crashed", "later"]  # no duplicate


async def test_restart_settles_what_the_workers_left(service, tmp_path):
    """Out of attempts -> failed saying so; a worker that had finished or failed before the
    crash -> that outcome, not a rerun; cancelled and finished jobs are left alone."""
    workdir = tmp_path / "trainer"
    store = JobStore(workdir / "jobs.sqlite")
    seed_job(store, workdir, "exhausted", "running", attempt=2)
    seed_job(store, workdir, "finished", "running", files={"result.json": '{"eval": {"tuned": {"t": {"acc": 0.5}}}}'})
    seed_job(store, workdir, "errored", "running", files={"error.json": '{"error": "base_model: no such model"}'})
    seed_job(store, workdir, "cancelled", "cancelled")
    store.update("cancelled", error="cancelled while queued")
    store.close()
    svc = await service(start_worker=False, max_attempts=2)
    jobs = {j.id: j for j in (await svc.client.jobs.list()).jobs}
    exhausted = jobs["exhausted"]
    assert exhausted.status == "failed" and exhausted.attempt == 2
    assert "interrupted 2 times" in exhausted.error and "--max-attempts is 2" in exhausted.error
    assert "no attempts left" in await svc.client.jobs.logs("exhausted")
    assert jobs["finished"].status == "succeeded" and jobs["finished"].eval.tuned == {"t": {"acc": 0.5}}
    assert jobs["errored"].status == "failed" and jobs["errored"].error == "base_model: no such model"
    assert jobs["cancelled"].status == "cancelled" and jobs["cancelled"].error == "cancelled while queued"
    assert all(j.attempt == 1 for j in jobs.values() if j.id != "exhausted")


async def test_graceful_stop_mid_job_requeues_it(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv("FAKE_WORKER_GATE", str(gate))
    settings = TrainerSettings(workdir=tmp_path / "trainer", poll_interval_s=0.1, cancel_grace_s=2)

    def started():
        app = create_app(settings, worker_command=FAKE_CMD)
        return app, in_process(app, "http://trainer", client=TrainerClient)

    app, running = started()
    async with running as client:
        job_id = (await client.jobs.create(request())).id
        for _ in range(200):  # until the worker has started and taken its first step
            if (await client.jobs.get(job_id)).progress.step == 1:
                break
            await asyncio.sleep(0.05)
        pid = app.state.trainer.runner.store.row(job_id)["pid"]
        assert pid and _alive(pid)
    # the block has shut the app down gracefully, the worker still waiting at the gate
    assert not _alive(pid)
    store = JobStore(settings.resolved_workdir / "jobs.sqlite")
    job = store.get(job_id)
    store.close()
    assert (job.status, job.attempt, job.progress.step, job.losses) == ("queued", 2, 0, [])
    gate.touch()
    app, running = started()
    async with running as client:
        for _ in range(400):
            job = await client.jobs.get(job_id)
            if job.status != "queued" and job.status != "running":
                break
            await asyncio.sleep(0.05)
        assert (job.status, job.attempt) == ("succeeded", 2), job
        log = await client.jobs.logs(job_id)
        assert "attempt 1 of 3 interrupted: the trainer service shut down while it ran" in log
        assert len((await client.jobs.list()).jobs) == 1


async def test_cancel_then_stop_stays_cancelled(service, wait_job, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_GATE", str(tmp_path / "never"))
    svc = await service(worker_command=FAKE_CMD)
    job_id = (await svc.client.jobs.create(request())).id
    await wait_job(svc.client, job_id, {"running"})
    assert (await svc.client.jobs.cancel(job_id)).status == "cancelled"
    await svc.runner.stop()
    await svc.runner.start()
    job = await svc.client.jobs.get(job_id)
    assert (job.status, job.attempt) == ("cancelled", 1)


async def test_lifespan_starts_twice_in_one_app(tmp_path):
    """Regression: the lifespan registered Prometheus metrics, so a second start raised
    'Duplicated timeseries in CollectorRegistry'."""
    app = create_app(TrainerSettings(workdir=tmp_path / "trainer"), start_worker=False)
    for round_ in (1, 2):
        async with in_process(app, "http://t", client=TrainerClient) as client:
            await client.jobs.create(request())
            assert len((await client.jobs.list()).jobs) == round_  # the same store, reopened
            metrics = (await client._http.get("/metrics")).text
            assert "negspace_trainer_jobs_queued " + f"{float(round_)}" in metrics


async def test_queue_limit_is_429_with_retry_after(service):
    svc = await service(start_worker=False, max_queued=2)
    for _ in range(2):
        await svc.client.jobs.create(request())
    response = await svc.client._http.post("/jobs", json=request().model_dump(mode="json"))
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "2 jobs are already queued" in response.json()["error"]["message"]
    with pytest.raises(RateLimitError):
        await svc.client.jobs.create(request())
    assert len((await svc.client.jobs.list()).jobs) == 2  # nothing half-created
    await svc.client.jobs.cancel((await svc.client.jobs.list()).jobs[0].id)
    await svc.client.jobs.create(request())  # room again
