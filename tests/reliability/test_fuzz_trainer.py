"""Schema fuzzing of the trainer's real app, once it exists, WITHOUT real training: a fuzzed
``POST /jobs`` must never start a fine-tune on this machine. The app is built with its worker
disabled (jobs stay queued), through the first of these ``create_app`` keywords it offers;
without one the module skips and says what it needs.

Same rules as the other services: no 5xx, no hang, responses match the schema; bounded, seeded.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import inspect
import shutil
import tempfile
from pathlib import Path

import pytest

if importlib.util.find_spec("negspace_trainer") is None or importlib.util.find_spec("negspace_trainer.app") is None:
    pytest.skip("negspace_trainer.app does not exist yet", allow_module_level=True)

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from negspace_trainer.app import create_app  # noqa: E402
from negspace_trainer.settings import TrainerSettings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402


def _app_without_worker(settings):
    """The real app whose job queue never starts a worker (jobs stay queued), or None.

    Asks the trainer's code, in order: ``create_app(..., start_worker=False)``; an injected
    ``JobRunner(..., start_worker=False)``; an injected JobRunner whose ``start`` does not start
    its job loop (the runner's ``submit``/``get``/``cancel``/``logs`` stay the real ones)."""
    params = inspect.signature(create_app).parameters
    if "start_worker" in params:
        return create_app(settings, start_worker=False)
    if "runner" not in params:
        return None
    runner_mod = next((importlib.import_module(m) for m in ("negspace_trainer.runner", "negspace_trainer.jobs")
                       if importlib.util.find_spec(m) is not None), None)
    if runner_mod is None or not hasattr(runner_mod, "JobRunner"):
        return None
    job_runner = runner_mod.JobRunner
    runner_params = inspect.signature(job_runner).parameters
    args = [settings]
    if "store" in runner_params:
        from negspace_trainer.store import JobStore

        settings.resolved_workdir.mkdir(parents=True, exist_ok=True)
        args.append(JobStore(settings.resolved_workdir / "jobs.sqlite"))
    if "start_worker" in runner_params:
        return create_app(settings, runner=job_runner(*args, start_worker=False))

    class QueueOnlyRunner(job_runner):
        async def start(self) -> None:  # no job loop: nothing is ever trained
            return None

    return create_app(settings, runner=QueueOnlyRunner(*args))


TMP = Path(tempfile.mkdtemp(prefix="negspace-fuzz-trainer-"))
atexit.register(shutil.rmtree, TMP, True)  # also when collected but deselected
# No orchestrator listens on port 9 (discard): datasets given by run_id fail fast (503, see below)
# instead of reaching whatever runs on this machine's default orchestrator port.
UNREACHABLE = "http://127.0.0.1:9"
APP = _app_without_worker(TrainerSettings(workdir=TMP, orchestrator_url=UNREACHABLE, max_queued=100_000))
if APP is None:
    pytest.skip("the trainer app cannot be built with its worker disabled (create_app(start_worker=False) "
                "or create_app(runner=JobRunner(..., start_worker=False))); fuzzing POST /jobs would start "
                "real training", allow_module_level=True)
# schemathesis ends and restarts an app's lifespan around every test item; the trainer's lifespan
# registers its Prometheus metrics and cannot start twice in one app (reported), so it runs once
# here, for the whole module, as it does once per process under uvicorn.
_lifespan = APP.router.lifespan_context
_started: list = []


@contextlib.asynccontextmanager
async def _once(app):
    if not _started:
        cm = _lifespan(app)
        await cm.__aenter__()
        _started.append(cm)
    yield


APP.router.lifespan_context = _once
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
FUZZ = settings(max_examples=25, deadline=10000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    asgi.shutdown_lifespans()
    shutil.rmtree(TMP, ignore_errors=True)


@schema.parametrize()
@FUZZ
def test_trainer_api_never_5xx_and_matches_its_schema(case, fuzz_record):
    dataset = case.body.get("dataset") if isinstance(case.body, dict) else None
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str) and "://" in dataset["path"]:
        # the trainer fetches http(s) dataset paths: keep generated URLs off the network
        case.body = {**case.body, "dataset": {**dataset, "path": f"{UNREACHABLE}/dataset.jsonl"}}
    response = case.call()
    fuzz_record(case, response)
    by_run_id = isinstance(dataset, dict) and dataset.get("run_id") is not None
    if response.status_code == 503 and by_run_id and "from the orchestrator" in response.text:
        # the documented answer when the orchestrator holding the run is down: not a bug
        case.validate_response(response, checks=[response_schema_conformance])
    else:
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
