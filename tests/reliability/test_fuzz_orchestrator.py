"""Schema fuzzing of the orchestrator's real app, with its dependencies in-process: the real node
app (FakeEngine), the real controller app (Qdrant ":memory:", HashingFakeEmbedder) and a FakeTrainer
(the trainer's job endpoints, answering from the contract models; no training).

Two passes: every operation with generated run ids (unknown ids: the 404 paths), then the
run operations against an existing, completed guided run (so generated bodies reach Q/A,
metrics, training hand-off, the event stream). Runs created by fuzzed ``POST /runs`` are
cancelled at once, so the fuzz set does not leave hundreds of rounds generating in the
background. None may answer 5xx, hang, or answer with a body its schema does not describe.
Bounded and seeded (derandomize).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from negspace_contracts.errors import NotFoundError
from negspace_contracts.trainer import Job, JobCreated, JobRequest
from negspace_controller.app import create_app as controller_app
from negspace_controller.settings import ControllerSettings
from negspace_controller.store_qdrant import LocalStore
from negspace_controller.testing import HashingFakeEmbedder
from negspace_node.app import create_app as node_app
from negspace_node.engines.fake import FakeEngine
from negspace_node.settings import NodeSettings
from negspace_orchestrator.app import create_app
from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_servekit.testing import lifespan
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

TMP = Path(tempfile.mkdtemp(prefix="negspace-fuzz-orch-"))
atexit.register(shutil.rmtree, TMP, True)  # also when collected but deselected
NODE, CONTROLLER, TRAINER = "http://node", "http://controller", "http://trainer"


def fake_trainer() -> FastAPI:
    """FakeTrainer: accepts jobs and reports them succeeded; nothing is trained."""
    app = FastAPI()
    jobs: dict[str, Job] = {}

    @app.get("/health")
    async def health():
        return {"status": "ok", "service": "trainer"}

    @app.post("/jobs", status_code=201)
    async def create(req: JobRequest) -> JobCreated:
        job = Job(id=uuid.uuid4().hex, status="succeeded", name=req.name, request=req)
        jobs[job.id] = job
        return JobCreated(id=job.id, status=job.status)

    @app.get("/jobs/{job_id}")
    async def get(job_id: str) -> Job:
        if job_id not in jobs:
            raise NotFoundError(f"no job {job_id}")
        return jobs[job_id]

    return app


# schemathesis ends an app's lifespan after each test item and starts it again on the next
# request, so the in-memory Qdrant store is injected (it outlives the controller's restarts, as
# a real Qdrant would) and the dependency clients are never closed by the lifespan.
CTL_APP = controller_app(ControllerSettings(qdrant_path=":memory:", index_snapshots="off"),
                         embedder=HashingFakeEmbedder(dimension=32), store=LocalStore(":memory:"))
SETTINGS = OrchestratorSettings(db=TMP / "orchestrator.db", data_dir=TMP / "exports", node_url=[NODE],
                                controller_url=CONTROLLER, trainer_url=TRAINER, retry_attempts=2,
                                retry_backoff_s=0.0, retry_max_backoff_s=0.0, health_interval_s=1.0)
DEPS = Dependencies(SETTINGS, transports={
    NODE: httpx.ASGITransport(app=node_app(NodeSettings(engine="fake"), engine=FakeEngine())),
    CONTROLLER: httpx.ASGITransport(app=CTL_APP, raise_app_exceptions=False),  # a 500, as over HTTP
    TRAINER: httpx.ASGITransport(app=fake_trainer())})
APP = create_app(SETTINGS, deps=DEPS)
_orch_lifespan = APP.router.lifespan_context


@contextlib.asynccontextmanager
async def _with_controller(app):
    # The controller app's own lifespan (it builds its Controller there) around the orchestrator's.
    async with lifespan(CTL_APP), _orch_lifespan(app):
        yield


APP.router.lifespan_context = _with_controller
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

FUZZ = settings(max_examples=25, deadline=10000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    asgi.shutdown_lifespans()
    shutil.rmtree(TMP, ignore_errors=True)


@pytest.fixture(scope="module")
def completed_run() -> str:
    with asgi.get_client(APP) as client:
        r = client.post("/runs", json={"base_instruction": "Write a question about rivers.", "nodes": 2,
                                       "rounds": 1, "seed": 1})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (run := client.get(f"/runs/{run_id}").json())["status"] not in ("completed", "failed",
                                                                               "paused", "cancelled"):
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run["status"] == "completed", run
        # FakeEngine's texts do not parse as Q/A pairs, so give the run converted pairs directly
        # (as a successful conversion would store them): the training hand-off is then reachable.
        store = APP.state.orchestrator.store
        for a in store.accepted(run_id):
            store.add_qa(run_id, a.point_id, "converted", f"Question about {a.text}?", "An answer.", "", 1)
        assert client.post(f"/runs/{run_id}/qa", json={}).status_code == 200
        assert client.get(f"/runs/{run_id}/qa").status_code == 200
    return run_id


def _cancel_if_created(case, response) -> None:
    if case.method.upper() == "POST" and case.path == "/runs" and response.status_code == 201:
        with asgi.get_client(APP) as client:
            client.post(f"/runs/{response.json()['id']}/cancel")


@schema.parametrize()
@FUZZ
def test_orchestrator_api_never_5xx_and_matches_its_schema(case, fuzz_record):
    response = case.call_and_validate(checks=CHECKS)
    _cancel_if_created(case, response)
    fuzz_record(case, response)


@schema.include(path_regex=r"\{run_id\}").parametrize()
@FUZZ
def test_orchestrator_api_on_a_completed_run(case, fuzz_record, completed_run):
    case.path_parameters = {**(case.path_parameters or {}), "run_id": completed_run}
    # Generated export_dir values go through as they are: the orchestrator confines them to its data
    # dir (TMP / "exports"), so the worst a generated one can do is write a folder there.
    response = case.call_and_validate(checks=CHECKS)
    fuzz_record(case, response, " [completed run]")



@pytest.mark.parametrize("where", ["existing-file", "too-long", "outside"])
def test_qa_export_dir_that_cannot_be_created_is_a_400(where, completed_run):
    """Found by this fuzzing (was an unhandled OSError, 500); fixed in f2a0036. Since export_dir is
    confined to the data dir, a folder outside it is refused before anything is created."""
    if where == "existing-file":
        (SETTINGS.exports_dir / "a-file").parent.mkdir(parents=True, exist_ok=True)
        (SETTINGS.exports_dir / "a-file").write_text("not a folder")
        export_dir = "a-file"
    elif where == "too-long":
        export_dir = "x" * 300  # one path component over the file system's 255 bytes
    else:
        export_dir = "/proc/negspace-no-such-dir"
    with asgi.get_client(APP) as client:
        try:
            r = client.post(f"/runs/{completed_run}/qa", json={"export_dir": export_dir})
        except OSError as exc:  # the in-process client re-raises what the app did not handle
            raise AssertionError(f"unhandled {exc!r} (a 500 over HTTP)") from exc
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "export_dir"
    assert ("outside" in r.json()["error"]["message"]) == (where == "outside")
    assert not Path("/proc/negspace-no-such-dir").exists()
