"""eval.include_path is confined to --task-dirs (lm-eval task YAML can import Python with
!function): checked at POST /jobs (422, param eval.include_path), and again by the worker."""

from __future__ import annotations

import os

import pytest
from negspace_contracts.trainer import JobRequest
from negspace_trainer import worker
from negspace_trainer.sources import TASK_DIRS_ENV

RECORD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def body(include_path: str) -> dict:
    return {"dataset": {"records": [RECORD]},
            "eval": {"tasks": ["negspace_arith"], "include_path": include_path}}


@pytest.fixture
def folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "mine").mkdir(parents=True)
    (allowed / "sub").mkdir()
    outside.mkdir()
    (outside / "evil.yaml").write_text("task: evil\n")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    (allowed / "sub" / "back").symlink_to(allowed / "mine", target_is_directory=True)  # stays inside
    (allowed / "file.yaml").write_text("task: x\n")
    return allowed, outside


async def test_include_path_inside_task_dirs_is_accepted(service, folders):
    allowed, _ = folders
    svc = await service(start_worker=False, task_dirs=[allowed])
    for given, stored in ((allowed / "mine", allowed / "mine"), ("mine", allowed / "mine"),
                          (allowed / "sub" / ".." / "mine", allowed / "mine"),
                          (allowed / "sub" / "back", allowed / "mine"), (allowed, allowed)):
        response = await svc.client._http.post("/jobs", json=body(str(given)))
        assert response.status_code == 201, (given, response.text)
        job = await svc.client.jobs.get(response.json()["id"])
        assert job.request.eval.include_path == str(stored)  # the worker gets the checked folder


async def test_include_path_outside_task_dirs_is_422(service, folders, tmp_path):
    allowed, outside = folders
    svc = await service(start_worker=False, task_dirs=[allowed])
    refused = {
        str(outside): "outside", "../outside": "outside", str(allowed / ".." / "outside"): "outside",
        str(allowed / "escape"): "outside", str(allowed / "escape" / "sub"): "outside", "/": "outside",
        "/etc": "outside", "~": "outside",
        str(tmp_path / "trainer" / "tasks"): "outside",  # the default folder is not allowed when set
        str(allowed / "missing"): "not a folder", str(allowed / "file.yaml"): "not a folder",
        "bad\x00name": "not a usable folder path",
    }
    for path, words in refused.items():
        response = await svc.client._http.post("/jobs", json=body(path))
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "eval.include_path", path
        assert words in error["message"], (path, error["message"])
        if words == "outside":
            assert "--task-dirs" in error["message"] and "TRAINER_TASK_DIRS" in error["message"]
    assert (await svc.client.jobs.list()).jobs == []


async def test_default_task_dirs_is_the_workdir_tasks_folder(service, tmp_path):
    svc = await service(start_worker=False)
    shipped = (await svc.client.tasks()).tasks[0].include_path  # what GET /tasks tells clients to use
    assert shipped == str((tmp_path / "trainer" / "tasks").resolve())
    assert (await svc.client._http.post("/jobs", json=body(shipped))).status_code == 201
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    response = await svc.client._http.post("/jobs", json=body(str(outside)))
    assert response.status_code == 422 and response.json()["error"]["param"] == "eval.include_path"


def test_the_worker_checks_include_path_again(folders, monkeypatch):
    """Settings can change across a restart and links can be swapped after POST /jobs."""
    allowed, outside = folders
    monkeypatch.setenv(TASK_DIRS_ENV, os.pathsep.join([str(outside / "nothing"), str(allowed)]))
    assert worker.checked_include_path(str(allowed / "mine")) == allowed / "mine"
    (allowed / "swapped").symlink_to(outside, target_is_directory=True)
    for path in (str(allowed / "swapped"), str(outside)):
        with pytest.raises(worker.JobError, match="outside the folders"):
            worker.checked_include_path(path)
    monkeypatch.delenv(TASK_DIRS_ENV)
    with pytest.raises(worker.JobError, match=TASK_DIRS_ENV):
        worker.checked_include_path(str(allowed / "mine"))


def test_task_dirs_setting_from_env_and_flags(monkeypatch, tmp_path):
    from negspace_trainer.settings import TrainerSettings

    monkeypatch.setenv("TRAINER_TASK_DIRS", f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert TrainerSettings(workdir=tmp_path).allowed_task_dirs == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("TRAINER_TASK_DIRS")
    assert TrainerSettings(workdir=tmp_path).allowed_task_dirs == [(tmp_path / "tasks").resolve()]
    JobRequest.model_validate(body("x"))  # the field itself stays a free string; the trainer checks it
