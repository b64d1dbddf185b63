"""Property test (hypothesis) against the REAL transformers engine on the bundled 135M model:
any schema-valid body, extreme floats included, answers 2xx or a 4xx that names what to fix;
never a 5xx, and the engine never dies."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from negspace_node.app import create_app
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import asgi_client, request_bodies

pytestmark = pytest.mark.slow

bodies = request_bodies


@pytest.fixture(scope="module")
def node(smol):
    model, tok = smol
    engine = TransformersEngine(NodeSettings(max_model_len=256), model=model, tokenizer=tok)
    asyncio.run(engine.start())
    app = create_app(NodeSettings(engine="transformers", max_model_len=256), engine=engine)
    return app, engine


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(request=bodies())
def test_any_schema_valid_body_gets_2xx_or_a_4xx_and_the_engine_lives(node, request):
    app, engine = node
    path, body = request

    async def call():
        async with asgi_client(app) as client:
            return await client.post(path, json=body)

    r = asyncio.run(call())
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"], body
    else:
        assert len(r.json()["choices"]) == body.get("n", 1)
    assert engine.state == "ready", engine.error
