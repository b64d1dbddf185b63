"""Schema fuzzing of the controller's real app: Qdrant ":memory:" and the hashing HashingFakeEmbedder
(the API plumbing, the index, the store and the metrics are the real ones; only the encoder is
replaced, so the fuzz set stays fast on 2 cores).

Two passes: every operation with generated path names (mostly unknown or invalid collection
names: 404/400 paths), then the collection operations against an existing, populated collection
(so generated bodies reach the index, the store and the metrics code). None may answer 5xx, hang,
or answer with a body its schema does not describe. Bounded and seeded (derandomize).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from negspace_controller.app import create_app
from negspace_controller.settings import ControllerSettings
from negspace_controller.testing import HashingFakeEmbedder
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

APP = create_app(ControllerSettings(qdrant_path=":memory:", index_snapshots="off"),
                 embedder=HashingFakeEmbedder(dimension=32, max_tokens=16))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

FUZZ = settings(max_examples=30, deadline=5000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, response_schema_conformance]
SEEDED = "fuzz-seeded"
TEXTS = ["Write a poem about the sea.", "Write a poem about rivers.", "Explain gravity to a child.",
         "List three prime numbers.", "Describe a busy market.", "Write a poem about the ocean."]


@pytest.fixture
def seeded_collection():
    """(Re)created before each operation's examples: the first pass deletes collections it finds."""
    with asgi.get_client(APP) as client:
        assert client.put(f"/collections/{SEEDED}").status_code in (200, 201)
        r = client.post(f"/collections/{SEEDED}/points",
                        json={"points": [{"id": i, "text": t, "payload": {"round": i % 2}}
                                         for i, t in enumerate(TEXTS)]})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("key", ["", ":", "0:0", "a["])
def test_metrics_filter_key_that_is_not_a_payload_path_is_a_400(key, seeded_collection):
    """Found by this fuzzing (was a 500 from qdrant-client's path parser); fixed in f2a0036."""
    with asgi.get_client(APP) as client:
        try:
            r = client.post(f"/collections/{SEEDED}/metrics", json={"filter": {key: None}})
        except ValueError as exc:  # the in-process client re-raises what the app did not handle
            raise AssertionError(f"unhandled {exc!r} (a 500 over HTTP)") from exc
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "filter"


def test_metrics_ragged_pca_basis_is_a_400(seeded_collection):
    """Found by this fuzzing (was a 500 from np.asarray); fixed in f2a0036."""
    with asgi.get_client(APP) as client:
        try:
            r = client.post(f"/collections/{SEEDED}/metrics", json={"pca_basis": [[], [0.0]]})
        except ValueError as exc:
            raise AssertionError(f"unhandled {exc!r} (a 500 over HTTP)") from exc
    assert r.status_code == 400, r.text


@schema.parametrize()
@FUZZ
def test_controller_api_never_5xx_and_matches_its_schema(case, fuzz_record):
    response = case.call_and_validate(checks=CHECKS)
    fuzz_record(case, response)


@schema.include(path_regex=r"\{name\}").exclude(method="DELETE").parametrize()
@FUZZ
def test_controller_api_on_an_existing_collection(case, fuzz_record, seeded_collection):
    case.path_parameters = {**(case.path_parameters or {}), "name": SEEDED}
    response = case.call_and_validate(checks=CHECKS)
    fuzz_record(case, response, " [existing]")
