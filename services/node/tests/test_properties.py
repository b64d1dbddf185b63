"""Property test (hypothesis) against the REAL transformers engine on the bundled 135M model:
any schema-valid body, extreme floats included, answers 2xx or a 4xx that names what to fix;
never a 5xx, and the engine never dies."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from negspace_node.app import create_app
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import asgi_client

pytestmark = pytest.mark.slow

EXTREME_UNIT = st.sampled_from([0.0, 5e-324, 1e-300, 1e-30, 1e-6, 9.99e-6, 1e-5, 0.5, 1.0])
UNIT = st.one_of(EXTREME_UNIT, st.floats(0.0, 1.0, allow_nan=False))
OPEN_UNIT = st.one_of(st.sampled_from([5e-324, 1e-300, 1e-9, 0.5, 1.0]), st.floats(1e-12, 1.0))
SCALE = st.one_of(st.sampled_from([0.0, 5e-324, 1.0, 1e30, 1e38, 3.5e38, 1e300, 1.7976931348623157e308]),
                  st.floats(0.0, 1e6, allow_nan=False))
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)


@st.composite
def bodies(draw):
    negatives = draw(st.lists(TEXT.filter(lambda t: t.strip()), max_size=3))
    body = {
        "max_tokens": draw(st.integers(1, 4)),
        "temperature": draw(st.one_of(EXTREME_UNIT, st.floats(0.0, 2.0, allow_nan=False), st.just(2.0))),
        "top_p": draw(OPEN_UNIT),
        "min_p": draw(UNIT),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        "negative_prompts": negatives,
        "guidance_scale": draw(SCALE),
        "guidance_space": draw(st.sampled_from(["logits", "logprobs"])),
        "guidance_combine": draw(st.sampled_from(["min", "mean", "max"])),
        "guidance_alpha": draw(st.one_of(st.none(), UNIT)),
        "guidance_max_tokens": draw(st.one_of(st.none(), st.integers(0, 5))),
    }
    if not negatives:
        body["n"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(TEXT, min_size=1, max_size=2))
    if draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(TEXT)}]
        return "/v1/chat/completions", body
    body["prompt"] = draw(TEXT)
    return "/v1/completions", body


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
