"""``stream: true`` (issue 12 item 6): server-sent events in OpenAI's chunk format.

- The wire format, errors after the stream started and a disconnect mid-stream, with FakeEngine
  (fast, the HTTP mechanics).
- The official ``openai`` client against the real app with the transformers engine on the
  bundled model: streamed text == non-streamed text (greedy and seeded sampling, guided and
  plain, chat and completions, stop strings), usage chunk, and a client that leaves mid-stream
  stops the group's decoding. (The same against vLLM: ``test_vllm_engine.py``.)
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from negspace_node.app import create_app
from negspace_node.engines.fake import FakeEngine
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import asgi_client, count_decode_steps, leave_after_three_steps, raw_post, serving

HI = [{"role": "user", "content": "Write a question about rivers."}]
NEGS = ["Write a question about lakes.", "Write a question about the sea."]


def events(body: str) -> list:
    """The ``data:`` payloads of an event stream, JSON-decoded (``[DONE]`` kept as the string)."""
    assert body.endswith("\n\n"), body[-80:]
    out = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def fake_app(engine=None, **settings):
    engine = engine or FakeEngine(max_model_len=256)
    return create_app(NodeSettings(engine="fake", **settings), engine=engine), engine


# -- the wire format (FakeEngine) ------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"negative_prompts": NEGS, "guidance_scale": 3.0}, {"n": 2},
                                   {"stop": ["e"]}])
async def test_chat_stream_is_openai_chunks_and_adds_up_to_the_plain_response(extra):
    app, _ = fake_app()
    body = {"messages": HI, "temperature": 0, **extra}
    async with asgi_client(app) as client:
        whole = (await client.post("/v1/chat/completions", json=body)).json()
        r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["guidance"] == whole["guidance"]
    n = len(whole["choices"])
    assert [c["delta"] for c in chunks[0]["choices"]] == [{"role": "assistant", "content": ""}] * n
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks[1:] if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(m["delta"].get("content", "") for m in mine) == choice["message"]["content"]
        assert mine[-1] == {"index": i, "delta": {}, "finish_reason": choice["finish_reason"], "logprobs": None}
        assert all(m["finish_reason"] is None for m in mine[:-1]) and len(mine) >= 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_completion_stream_chunks_and_no_usage_unless_asked():
    app, _ = fake_app()
    body = {"prompt": "Once", "temperature": 0, "negative_prompts": NEGS, "guidance_scale": 2.0}
    async with asgi_client(app) as client:
        whole = (await client.post("/v1/completions", json=body)).json()
        chunks = events((await client.post("/v1/completions", json={**body, "stream": True})).text)
    assert chunks.pop() == "[DONE]"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[0]["guidance"] == whole["guidance"] and chunks[1]["guidance"] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "finish_reason": whole["choices"][0]["finish_reason"],
                                        "logprobs": None}


async def test_refusals_before_the_stream_are_plain_4xx_json():
    app, engine = fake_app()
    async with asgi_client(app) as client:
        missing = await client.post("/v1/chat/completions", json={"messages": HI, "stream": True, "model": "x"})
        too_long = await client.post("/v1/completions", json={"prompt": "hi", "stream": True, "max_tokens": 300})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]
    assert engine.requests == []


async def test_an_error_after_the_stream_started_is_an_error_event_then_done():
    app, _ = fake_app(FakeEngine(max_model_len=256, fail_with="CUDA error: device lost"))
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", json={"messages": HI, "stream": True})
    assert r.status_code == 200
    chunks = events(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["error"]["code"] == 503 and "device lost" in chunks[-2]["error"]["message"]
    assert chunks[-1] == "[DONE]"


async def test_a_deadline_mid_stream_is_an_error_event():
    app, engine = fake_app(FakeEngine(max_model_len=256, delay=5.0), request_timeout_s=0.2)
    async with asgi_client(app) as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    chunks = events(r.text)
    assert chunks[-2]["error"]["type"] == "deadline_exceeded" and chunks[-1] == "[DONE]"
    assert engine.queue_depth() == 0 and app.state.node.in_flight == 0


async def test_a_client_that_leaves_mid_stream_cancels_the_generation():
    app, engine = fake_app(FakeEngine(max_model_len=256, delay=30.0))
    t0 = time.monotonic()
    status, ended = await raw_post(app, "/v1/chat/completions", {"messages": HI, "stream": True,
                                                                  "negative_prompts": NEGS, "guidance_scale": 2},
                                   disconnect_when=lambda: time.monotonic() - t0 > 0.3)
    assert status == 200 and ended - t0 < 3
    await asyncio.sleep(0.05)
    assert engine.queue_depth() == 0 and app.state.node.in_flight == 0
    async with asgi_client(app) as client:
        assert 'endpoint="chat",mode="guided",outcome="cancelled"' in (await client.get("/metrics")).text


# -- the official openai client, real transformers engine on the bundled model ----------------
@pytest.fixture
async def real(smol):
    model, tok = smol
    settings = NodeSettings(engine="transformers", max_model_len=512)
    engine = TransformersEngine(settings, model=model, tokenizer=tok)
    app = create_app(settings, engine=engine)
    async with serving(app):
        yield app, engine


def openai_client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://node/v1", api_key="x", max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))


async def streamed_chat(client, **kw) -> tuple[list[str], list[str | None], object]:
    """(text per choice, finish_reason per choice, usage) of a streamed chat completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)], usage


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(temperature=0, extra_body={"negative_prompts": NEGS, "guidance_scale": 3.0}),
    dict(temperature=0.9, seed=7, stop=["?"], extra_body={"negative_prompts": NEGS, "guidance_scale": 2.0,
                                                         "guidance_max_tokens": 3}),
    dict(temperature=0.8, seed=3, n=2),
])
async def test_openai_client_stream_equals_the_non_streamed_reply(real, kw):
    app, _ = real
    async with openai_client(app) as client:
        whole = await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HI, max_tokens=16, **kw)
        texts, reasons, usage = await streamed_chat(client, model="SmolLM2-135M-Instruct", messages=HI,
                                                    max_tokens=16, **kw)
    assert texts == [c.message.content for c in whole.choices] and all(texts)
    assert reasons == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.slow
async def test_openai_client_streams_completions_and_sees_done(real):
    app, _ = real
    body = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8, temperature=0,
                extra_body={"negative_prompts": ["The capital of Spain is"], "guidance_scale": 2.0})
    async with openai_client(app) as client:
        whole = await client.completions.create(**body)
        text, reason = "", None
        async for chunk in await client.completions.create(stream=True, **body):
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
    assert text == whole.choices[0].text and reason == whole.choices[0].finish_reason
    # [DONE] ends the stream (the client stops there; the raw body shows it).
    async with asgi_client(app) as http:
        raw = await http.post("/v1/completions", json={**{k: v for k, v in body.items() if k != "extra_body"},
                                                       **body["extra_body"], "stream": True})
    assert raw.text.endswith("data: [DONE]\n\n")


@pytest.mark.slow
async def test_openai_client_raises_an_error_event_as_api_error(real, monkeypatch):
    import negspace_node.engines.transformers as module

    app, engine = real
    real_sample = module.sample_batch
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated draw failure")
        return real_sample(*args)

    monkeypatch.setattr(module, "sample_batch", failing)
    async with openai_client(app) as client:
        with pytest.raises(openai.APIError, match="simulated draw failure"):
            await streamed_chat(client, model="SmolLM2-135M-Instruct", messages=HI, max_tokens=12, temperature=0,
                                extra_body={"negative_prompts": NEGS, "guidance_scale": 3.0})
    assert engine.state == "ready"


@pytest.mark.slow
async def test_leaving_mid_stream_stops_the_groups_decoding(real, monkeypatch):
    app, engine = real
    steps = count_decode_steps(monkeypatch)
    status = await leave_after_three_steps(app, engine, steps, {"messages": HI, "negative_prompts": NEGS,
                                                                "guidance_scale": 2, "stream": True})
    assert status == 200
