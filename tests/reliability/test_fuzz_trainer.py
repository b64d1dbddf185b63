"""Schema fuzzing of the trainer's real app WITHOUT real training: a fuzzed ``POST /jobs`` must
never start a fine-tune on this machine, so the app is built with ``start_worker=False`` (jobs
are accepted and stay queued).

Same rules as the other services: no 5xx, no hang, responses match the schema; bounded, seeded.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

TMP = Path(tempfile.mkdtemp(prefix="negspace-fuzz-trainer-"))
atexit.register(shutil.rmtree, TMP, True)  # also when collected but deselected
# start_worker=False: the real app and job runner, but jobs stay queued, so fuzzed POST /jobs
# never starts real training.
APP = create_app(TrainerSettings(workdir=TMP, max_queued=100_000),
                 start_worker=False)
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
    # No --dataset-url-prefixes: generated dataset URLs are refused (422) and never fetched;
    # generated file paths outside <workdir>/datasets are refused without being read.
    response = case.call()
    fuzz_record(case, response)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
