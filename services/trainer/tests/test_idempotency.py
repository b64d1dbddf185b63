"""POST /jobs with an idempotency_key is safe to retry: the same key and request return the job
created the first time (200, no second job), also after a trainer restart; the same key with a
different request is a 409. No worker runs here (start_worker=False)."""

from __future__ import annotations

import asyncio
import json

import pytest
from negspace_contracts.errors import BadRequestError, ConflictError
from negspace_contracts.trainer import JobRequest, TrainerClient
from negspace_servekit.testing import in_process
from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore

RECORD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def request(**kw) -> JobRequest:
    body = {"dataset": {"records": [RECORD] * 2}, "training": {"max_steps": 5}}
    body.update(kw)
    return JobRequest.model_validate(body)


async def test_same_key_twice_is_one_job(service):
    svc = await service(start_worker=False)
    first = await svc.client.jobs.create(request(), idempotency_key="run-1-train-a")
    assert not first.replayed
    again = await svc.client.jobs.create(request(), idempotency_key="run-1-train-a")
    assert (again.id, again.replayed) == (first.id, True)
    # the wire: 201 the first time, 200 with Idempotent-Replayed on a repeat; defaults spelled
    # out in the body are the same request as defaults left out
    body = request(idempotency_key="run-1-train-a", method="lora").model_dump(mode="json")
    response = await svc.client._http.post("/jobs", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == first.id and response.headers["Idempotent-Replayed"] == "true"
    jobs = (await svc.client.jobs.list()).jobs
    assert [j.id for j in jobs] == [first.id]
    assert jobs[0].request.idempotency_key == "run-1-train-a"
    assert [j.id for j in (await svc.client.jobs.list(idempotency_key="run-1-train-a")).jobs] == [first.id]
    assert (await svc.client.jobs.list(idempotency_key="never-used")).jobs == []
    # no key: every POST is a new job; another key: another job
    plain = [await svc.client.jobs.create(request()) for _ in range(2)]
    other = await svc.client.jobs.create(request(), idempotency_key="run-1-train-b")
    assert len({first.id, other.id, *(p.id for p in plain)}) == 4
    assert len((await svc.client.jobs.list()).jobs) == 4


async def test_same_key_with_a_different_request_is_a_409(service):
    svc = await service(start_worker=False)
    first = await svc.client.jobs.create(request(), idempotency_key="k1")
    for changed in (request(training={"max_steps": 6}), request(name="other"),
                    request(dataset={"records": [RECORD]})):
        with pytest.raises(ConflictError) as ei:
            await svc.client.jobs.create(changed, idempotency_key="k1")
        assert ei.value.status_code == 409 and ei.value.param == "idempotency_key"
        assert first.id in ei.value.message and "different request" in ei.value.message
    assert [j.id for j in (await svc.client.jobs.list()).jobs] == [first.id]


async def test_bad_keys_are_422(service):
    svc = await service(start_worker=False)
    for key in ("", "has space", "x" * 256, "tab\there", "é"):
        body = {**request().model_dump(mode="json"), "idempotency_key": key}
        response = await svc.client._http.post("/jobs", json=body)
        assert response.status_code == 422, (key, response.text)
        assert "idempotency_key" in response.text
    with pytest.raises(BadRequestError):
        await svc.client.jobs.list(idempotency_key="x" * 256)
    assert (await svc.client.jobs.list()).jobs == []


async def test_a_replay_answers_even_when_the_queue_is_full_or_the_file_is_gone(service, tmp_path):
    """The key is looked up first: a retry is not refused for what changed since the job was made."""
    data = tmp_path / "trainer" / "datasets"
    svc = await service(start_worker=False, max_queued=1)
    (data / "d.jsonl").write_text(json.dumps(RECORD) + "\n")
    body = JobRequest.model_validate({"dataset": {"path": "d.jsonl"}})
    first = await svc.client.jobs.create(body, idempotency_key="file-job")
    (data / "d.jsonl").unlink()
    again = await svc.client.jobs.create(body, idempotency_key="file-job")  # queue full, file gone
    assert again.id == first.id and again.replayed


async def test_concurrent_posts_with_one_key_make_one_job(service, tmp_path):
    data = tmp_path / "trainer" / "datasets"
    svc = await service(start_worker=False)
    (data / "big.jsonl").write_text((json.dumps(RECORD) + "\n") * 20_000)  # read in a thread: overlaps
    body = JobRequest.model_validate({"dataset": {"path": "big.jsonl"}})
    created = await asyncio.gather(*(svc.client.jobs.create(body, idempotency_key="race") for _ in range(4)))
    assert len({c.id for c in created}) == 1
    assert sum(not c.replayed for c in created) == 1
    assert len((await svc.client.jobs.list()).jobs) == 1
    assert len(list(svc.runner.jobs_dir.iterdir())) == 1  # the losers' folders were removed


async def test_keys_survive_a_trainer_restart(tmp_path):
    settings = TrainerSettings(workdir=tmp_path / "trainer")

    async def once(req: JobRequest, key: str):
        app = create_app(settings, start_worker=False)
        async with in_process(app, "http://trainer", client=TrainerClient) as client:
            return await client.jobs.create(req, idempotency_key=key), (await client.jobs.list()).jobs

    first, _ = await once(request(), "survives")
    again, jobs = await once(request(), "survives")  # a new app (and process state) on the same workdir
    assert again.id == first.id and again.replayed and len(jobs) == 1
    with pytest.raises(ConflictError):
        await once(request(name="changed"), "survives")


def test_a_jobs_database_from_before_keys_gets_the_columns(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT, "
                      "status TEXT NOT NULL, request TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '{}', "
                      "losses TEXT NOT NULL DEFAULT '[]', eval TEXT NOT NULL DEFAULT '{}', error TEXT, "
                      "pid INTEGER, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT);")
    old.execute("INSERT INTO jobs (id, seq, status, request, created_at) VALUES ('old', 1, 'succeeded', ?, "
                "'2024-01-01T00:00:00+00:00')", (request().model_dump_json(),))
    old.commit()
    old.close()
    store = JobStore(path)
    try:
        assert store.get("old").status == "succeeded" and store.by_key("k") is None
        store.create("new", request(idempotency_key="k"), "hash")
        assert store.by_key("k") == ("new", "hash")
        with pytest.raises(sqlite3.IntegrityError):
            store.create("dup", request(idempotency_key="k"), "hash")
    finally:
        store.close()
