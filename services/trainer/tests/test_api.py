"""API and job-lifecycle tests (no training: workers here are cancelled or killed early)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest
from negspace_contracts.errors import ConflictError, NotFoundError
from negspace_contracts.trainer import JobRequest

RECORD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def request(**kw) -> JobRequest:
    body = {"dataset": {"records": [RECORD] * 4}, "training": {"max_steps": 50, "batch_size": 2}}
    body.update(kw)
    return JobRequest.model_validate(body)


async def test_invalid_datasets_are_422(service):
    svc = await service(start_worker=False)
    for dataset in ({"records": []}, {"records": [{"text": "no messages"}]}, {},
                    {"records": [{"messages": [{"role": "user", "content": "only a question"}]}]}):
        response = await svc.client._http.post("/jobs", json={"dataset": dataset})
        assert response.status_code == 422, (dataset, response.text)
        assert response.json()["error"]["message"]
    assert (await svc.client.jobs.list()).jobs == []


async def test_dataset_files_are_checked_when_submitted(service, tmp_path):
    data = tmp_path / "trainer" / "datasets"  # the default --dataset-dirs, made at start
    svc = await service(start_worker=False)
    empty, bad, good = data / "empty.jsonl", data / "bad.jsonl", data / "good.jsonl"
    empty.write_text("\n")
    bad.write_text(json.dumps(RECORD) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    good.write_text(json.dumps(RECORD) + "\n")
    fifo = data / "fifo.jsonl"
    os.mkfifo(fifo)  # must not hang the request
    for path, words in ((data / "missing.jsonl", "not a readable file"), (empty, "no records"),
                        (bad, "line 2"), ("bad\x00name", "not a usable file path"), (data, "not a regular file"),
                        (fifo, "not a regular file")):
        response = await svc.client._http.post("/jobs", json={"dataset": {"path": str(path)}})
        assert response.status_code == 422, (path, response.text)
        assert words in response.json()["error"]["message"]
        assert response.json()["error"]["param"] == "dataset.path"
    assert (await svc.client.jobs.list()).jobs == []
    created = await svc.client.jobs.create(JobRequest.model_validate({"dataset": {"path": str(good)}}))
    relative = await svc.client.jobs.create(JobRequest.model_validate({"dataset": {"path": "good.jsonl"}}))
    good.write_text("")  # the job trains on what the file held when it was submitted
    for job_id in (created.id, relative.id):
        copied = svc.runner.job_dir(job_id) / "dataset.jsonl"
        assert [json.loads(line) for line in copied.read_text().splitlines()] == [RECORD]


async def test_dataset_path_is_confined_to_dataset_dirs(service, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    for folder in (allowed, outside):
        (folder / "d.jsonl").write_text(json.dumps(RECORD) + "\n")
    (allowed / "escape.jsonl").symlink_to(outside / "d.jsonl")
    (allowed / "escape_dir").symlink_to(outside)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "inside.jsonl").symlink_to(allowed / "d.jsonl")  # a link that stays inside: fine
    svc = await service(start_worker=False, dataset_dirs=[allowed])

    async def post(path: str) -> httpx.Response:
        return await svc.client._http.post("/jobs", json={"dataset": {"path": path}})

    for path in (allowed / "d.jsonl", allowed / "sub" / "inside.jsonl", allowed / "sub" / ".." / "d.jsonl",
                 "sub/inside.jsonl"):
        assert (await post(str(path))).status_code == 201, path
    refused = [outside / "d.jsonl", allowed / ".." / "outside" / "d.jsonl", "../outside/d.jsonl",
               allowed / "escape.jsonl", allowed / "escape_dir" / "d.jsonl", "/etc/passwd",
               "/nonexistent/x.jsonl", "~/x.jsonl", tmp_path / "trainer" / "jobs.sqlite"]
    for path in refused:
        response = await post(str(path))
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "dataset.path" and "--dataset-dirs" in error["message"], (path, error)
        assert str(allowed) in error["message"]  # says where files may be
    assert len((await svc.client.jobs.list()).jobs) == 4


async def test_dataset_urls_are_refused_unless_allowed(service):
    svc = await service(start_worker=False)

    async def post(url: str) -> httpx.Response:
        return await svc.client._http.post("/jobs", json={"dataset": {"path": url}})

    for url in ("http://169.254.169.254/latest/meta-data", "https://data.example.org/negspace/d.jsonl"):
        response = await post(url)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "dataset.path" and "--dataset-url-prefixes" in error["message"]
    response = await post("file:///etc/passwd")
    assert response.status_code == 422 and "only http:// and https://" in response.text

    svc = await service(start_worker=False, dataset_url_prefixes=["https://data.example.org/negspace/"])
    created = await svc.client.jobs.create(JobRequest.model_validate(
        {"dataset": {"path": "https://DATA.example.org/negspace/sub/../d.jsonl"}}))
    job = await svc.client.jobs.get(created.id)
    assert job.request.dataset.path == "https://data.example.org/negspace/d.jsonl"  # what the worker fetches
    for url in ("https://data.example.org/other/d.jsonl", "https://data.example.org/negspace/../secret",
                "https://data.example.org.evil.net/negspace/d.jsonl", "http://data.example.org/negspace/d.jsonl",
                "https://data.example.org/negspace/%2e%2e/secret", "https://x@data.example.org/negspace/d.jsonl",
                "https://data.example.org/negspace\\..\\secret"):
        response = await post(url)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["param"] == "dataset.path"
    assert len((await svc.client.jobs.list()).jobs) == 1


def test_dataset_url_prefix_setting_must_name_its_host():
    from negspace_trainer.settings import TrainerSettings
    from pydantic import ValidationError

    for prefix in ("https://data.example.org", "ftp://x/", "data.example.org/"):
        with pytest.raises(ValidationError, match="names its host"):
            TrainerSettings(dataset_url_prefixes=[prefix])
    assert TrainerSettings(dataset_url_prefixes="https://a.org/x/,https://b.org/").dataset_url_prefixes == [
        "https://a.org/x/", "https://b.org/"]


async def test_tasks_health_metrics_and_unknown_job(service):
    svc = await service()
    tasks = (await svc.client.tasks()).tasks
    arith = next(t for t in tasks if t.name == "negspace_arith")
    assert arith.num_docs == 50
    assert os.path.isfile(os.path.join(arith.include_path, "negspace_arith.yaml"))
    assert (await svc.client.health()).status == "ok"
    with pytest.raises(NotFoundError):
        await svc.client.jobs.get("nope")
    metrics = await svc.client._http.get("/metrics")
    assert "negspace_trainer_jobs_queued" in metrics.text


def test_materialized_task_is_found_by_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager
    from negspace_trainer import local_tasks

    folder = local_tasks.materialize(tmp_path / "tasks")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert "negspace_arith" in manager.all_tasks
    task = manager.load(["negspace_arith"])["tasks"]["negspace_arith"]
    docs = list(task.test_docs())
    assert len(docs) == 50 and all(d["answer"].lstrip("-").isdigit() for d in docs)


async def test_cancel_queued_and_running(service, wait_job):
    svc = await service()
    first = await svc.client.jobs.create(request())
    second = await svc.client.jobs.create(request())
    await wait_job(svc.client, first.id, {"running"})
    assert (await svc.client.jobs.get(second.id)).status == "queued"
    cancelled = await svc.client.jobs.cancel(second.id)
    assert cancelled.status == "cancelled"
    running = await svc.client.jobs.cancel(first.id)
    assert running.status == "cancelled", running
    with pytest.raises(ConflictError):
        await svc.client.jobs.cancel(first.id)


async def test_killed_worker_fails_with_reason(service, wait_job):
    svc = await service()
    created = await svc.client.jobs.create(request())
    await wait_job(svc.client, created.id, {"running"})
    for _ in range(100):
        row = svc.runner.store.row(created.id)
        if row["pid"]:
            break
        await asyncio.sleep(0.1)
    os.kill(row["pid"], signal.SIGKILL)
    job = await wait_job(svc.client, created.id, {"failed"}, timeout=30)
    assert "worker killed by signal 9" in job.error


async def test_a_run_id_dataset_is_422_because_the_orchestrator_pushes_datasets(service):
    """The trainer never calls the orchestrator: a job naming an orchestrator run is refused at once,
    saying so; the records the orchestrator pushes inline are what the job trains on."""
    svc = await service(start_worker=False)
    response = await svc.client._http.post("/jobs", json={"dataset": {"run_id": "r1"}})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "run_id" in message and "the orchestrator pushes" in message
    assert (await svc.client.jobs.list()).jobs == []

    pushed = [RECORD, {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    created = await svc.client.jobs.create(request(dataset={"records": pushed}))
    written = (svc.runner.job_dir(created.id) / "dataset.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == pushed
    # a request stored before dataset.run_id was removed (it spelled "run_id": null) still reads back
    stored = json.loads(request().model_dump_json())
    stored["dataset"]["run_id"] = None
    assert JobRequest.model_validate(stored) == request()


async def test_unknown_eval_task_fails_naming_local_tasks(service, wait_job):
    svc = await service()
    created = await svc.client.jobs.create(request(eval={"tasks": ["no_such_task_xyz"]}))
    job = await wait_job(svc.client, created.id, {"failed", "succeeded"}, timeout=180)
    assert job.status == "failed"
    assert "no_such_task_xyz" in job.error and "negspace_arith" in job.error
    assert job.losses == []  # it failed before training


@pytest.mark.slow
async def test_cancel_while_training_stops_the_worker(service, wait_training):
    """Cancel mid-training (the worker has loaded the model and taken steps), not just mid-start."""
    svc = await service()
    created = await svc.client.jobs.create(request(training={"max_steps": 500, "batch_size": 2,
                                                             "max_length": 64}))
    await wait_training(svc.client, created.id)
    pid = svc.runner.store.row(created.id)["pid"]
    job = await svc.client.jobs.cancel(created.id)
    assert job.status == "cancelled" and 1 <= job.progress.step < 500, job
    assert job.losses  # what it trained before the cancel stays recorded
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the worker's whole process group is gone
