"""Schema fuzzing of the node's real app (FakeEngine: no model, deterministic): every operation of
its OpenAPI schema gets generated valid and invalid requests; none may answer 5xx, hang, or answer
with a body its schema does not describe.

Bounded (max_examples per operation, a per-example deadline) and seeded (derandomize) so CI sees
the same cases every run. ``pytest -s`` prints the statuses seen per operation.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from negspace_node.app import create_app
from negspace_node.engines.fake import FakeEngine
from negspace_node.settings import NodeSettings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

# A small context, so "prompt + max_tokens does not fit" is reachable by generated requests.
APP = create_app(NodeSettings(engine="fake", max_queue=8), engine=FakeEngine(max_model_len=512))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

FUZZ = settings(max_examples=40, deadline=5000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, response_schema_conformance]


@schema.parametrize()
@FUZZ
def test_node_api_never_5xx_and_matches_its_schema(case, fuzz_record):
    response = case.call_and_validate(checks=CHECKS)
    fuzz_record(case, response)
