"""The node's HTTP API against FakeEngine, in-process: validation, errors, back-pressure, metrics,
the typed NodeClient, the start-up states. No model is loaded here."""

from __future__ import annotations

import asyncio

import pytest
from negspace_contracts.errors import NotFoundError, RateLimitError, ServiceUnavailableError
from negspace_contracts.node import ChatCompletionRequest, CompletionRequest, NodeClient
from negspace_node.app import create_app
from negspace_node.engines.fake import FAKE_MODEL_NAME, FakeEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import asgi_client, serving
from negspace_servekit.testing import lifespan

CTX = 256
HI = [{"role": "user", "content": "Write a question about rivers."}]


def make(engine: FakeEngine | None = None, **settings):
    engine = engine or FakeEngine(max_model_len=CTX)
    return create_app(NodeSettings(engine="fake", **settings), engine=engine), engine


async def post(app, path, body, **kw):
    async with asgi_client(app) as client:
        return await client.post(path, json=body, **kw)


async def test_chat_happy_path_shape_and_what_the_engine_received():
    app, engine = make()
    r = await post(app, "/v1/chat/completions", {"messages": HI, "negative_prompts": ["A question about lakes."],
                                                  "guidance_scale": 3.0, "temperature": 0, "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == FAKE_MODEL_NAME
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["guidance"] == {"scale": 3.0, "num_negatives": 1, "space": "logits", "combine": "min",
                                "alpha": None, "max_tokens": None}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    sent = engine.requests[-1]
    tok = engine.tokenizer
    # the negative is rendered as a user turn with the same template and the generation prompt
    expected_neg = tok.encode(tok.apply_chat_template([{"role": "user", "content": "A question about lakes."}],
                                                      add_generation_prompt=True), add_special_tokens=False)
    assert sent.negative_ids == [expected_neg] and sent.guided and sent.temperature == 0
    assert usage["prompt_tokens"] == len(sent.prompt_ids)


async def test_openai_message_forms_content_parts_and_developer_role():
    app, engine = make()
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Ok."}]},
             {"role": "user", "content": "Hi", "name": "ann"}]
    r = await post(app, "/v1/chat/completions", {"messages": parts})
    assert r.status_code == 200, r.text
    tok = engine.tokenizer
    assert engine.requests[-1].prompt_ids == tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": "Be brief. Ok."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True), add_special_tokens=False)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    r = await post(app, "/v1/chat/completions", {"messages": image})
    assert r.status_code == 422 and "messages.0.content" in r.json()["error"]["message"]


async def test_completions_and_plain_n_choices():
    app, engine = make()
    r = await post(app, "/v1/completions", {"prompt": "Once upon a time", "n": 3, "seed": 4, "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) == 3
    assert body["guidance"] == {"scale": 1.0, "num_negatives": 0, "space": "logits", "combine": "min",
                                "alpha": None, "max_tokens": None}
    assert engine.requests[-1].prompt_ids == engine.tokenizer.encode("Once upon a time")


async def test_fake_output_depends_on_seed_negatives_and_scale_and_is_deterministic():
    app, _ = make()

    async def text(**extra):
        r = await post(app, "/v1/chat/completions", {"messages": HI, "temperature": 0.8, "seed": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    base = await text()
    assert base == await text()
    assert base != await text(seed=2)
    guided = await text(negative_prompts=["lakes"], guidance_scale=2.0)
    assert guided != base
    assert guided != await text(negative_prompts=["lakes"], guidance_scale=4.0)
    assert guided != await text(negative_prompts=["seas"], guidance_scale=2.0)
    assert await text(negative_prompts=["lakes"], guidance_scale=1.0) == base   # s=1 is plain
    assert await text(temperature=0, seed=1) == await text(temperature=0, seed=2)  # greedy ignores the seed


async def test_stop_strings_cut_the_text():
    app, _ = make()
    full = (await post(app, "/v1/completions", {"prompt": "x", "temperature": 0})).json()["choices"][0]["text"]
    word = full.split()[2]
    r = await post(app, "/v1/completions", {"prompt": "x", "temperature": 0, "stop": [" " + word]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[:full.index(" " + word)]


LONG = "word " * 400


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/chat/completions", {"messages": []}, 422, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": HI, "negative_prompts": ["n"] * 17}, 422, "negative_prompts", "at most 16"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": CTX + 1}, 400, "max_tokens", "exceeds the context"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": CTX - 10}, 400, "max_tokens", "does not fit"),
    ("/v1/chat/completions", {"messages": HI, "guidance_scale": -1}, 422, "guidance_scale", "finite number >= 0"),
    ("/v1/chat/completions", {"messages": HI, "negative_prompts": ["n"], "n": 2}, 422, None, "n must be 1"),
    ("/v1/chat/completions", {"messages": HI, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "shorten it"),
    ("/v1/chat/completions", {"messages": HI, "negative_prompts": ["ok", LONG]}, 400, "negative_prompts[1]",
     "shorten it"),
    ("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True}}, 422, None,
     "only allowed with stream=true"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "stream_options": {"bogus": 1}}, 422,
     "stream_options.bogus", "not permitted"),
    ("/v1/chat/completions", {"messages": HI, "frequency_penalty": 0.5}, 422, "frequency_penalty", "not permitted"),
    ("/v1/completions", {"prompt": ""}, 422, "prompt", "at least 1"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "shorten it"),
    ("/v1/completions", {"prompt": "hi", "negative_prompts": [LONG]}, 400, "negative_prompts[0]", "shorten it"),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": HI, "guidance_combine": "median"}, 422, "guidance_combine",
     "'min', 'mean' or 'max'"),
    ("/v1/chat/completions", {"messages": HI, "guidance_alpha": 1.5}, 422, "guidance_alpha", "less than or equal to 1"),
    ("/v1/chat/completions", {"messages": HI, "guidance_alpha": -0.1}, 422, "guidance_alpha", "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": HI, "guidance_max_tokens": -1}, 422, "guidance_max_tokens",
     "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": HI, "guidance_max_tokens": 2.5}, 422, "guidance_max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.01}, 422, "min_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "min_p": -1}, 422, "min_p", "greater than or equal to 0"),
])
async def test_bad_input_gets_the_exact_4xx_and_says_what_to_fix(path, body, status, param, says):
    app, engine = make()
    r = await post(app, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["code"] == status
    if param is not None:
        assert error["param"] == param
    if status == 404:
        assert error["type"] == "model_not_found"
    assert engine.requests == []          # nothing reached the engine


@pytest.mark.parametrize("field", ["guidance_alpha", "min_p", "temperature", "top_p"])
async def test_nan_sampling_options_are_refused(field):
    app, engine = make()
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}],'
                              b' "%s": NaN}' % field.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field and engine.requests == []


async def test_method_options_reach_the_engine_and_are_echoed():
    app, engine = make()
    body = {"messages": HI, "negative_prompts": ["A question about lakes.", "Rain."], "guidance_scale": 2.5,
            "guidance_combine": "mean", "guidance_alpha": 0.1, "guidance_max_tokens": 3, "min_p": 0.05,
            "guidance_space": "logprobs"}
    r = await post(app, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["guidance"] == {"scale": 2.5, "num_negatives": 2, "space": "logprobs", "combine": "mean",
                                    "alpha": 0.1, "max_tokens": 3}
    sent = engine.requests[-1]
    assert (sent.guidance.combine, sent.guidance.alpha, sent.guidance.max_tokens, sent.min_p) == ("mean", 0.1, 3, 0.05)
    # alpha 0 is "off" (echoed as null); plain requests carry min_p too
    r = await post(app, "/v1/completions", {"prompt": "hi", "guidance_alpha": 0, "min_p": 0.2})
    assert r.status_code == 200 and r.json()["guidance"]["alpha"] is None
    assert engine.requests[-1].guidance.alpha is None and engine.requests[-1].min_p == 0.2


async def test_nan_guidance_scale_is_refused():
    app, _ = make()
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}],'
                              b' "guidance_scale": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"]


async def test_default_max_tokens_is_capped_by_the_context():
    app, engine = make(default_max_tokens=10_000)
    r = await post(app, "/v1/completions", {"prompt": "abc"})
    assert r.status_code == 200
    assert engine.requests[-1].max_tokens == CTX - len(engine.tokenizer.encode("abc"))


async def test_full_queue_answers_429_with_retry_after():
    app, engine = make(FakeEngine(max_model_len=CTX, delay=0.3), max_queue=2)
    async with asgi_client(app) as client:
        first = [asyncio.create_task(client.post("/v1/completions", json={"prompt": f"p{i}"})) for i in range(2)]
        while app.state.node.in_flight < 2:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/completions", json={"prompt": "p3"})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1 and "capacity" in refused.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
        assert "negspace_node_queue_depth 2.0" in metrics
        assert all(r.status_code == 200 for r in await asyncio.gather(*first))
        assert (await client.post("/v1/completions", json={"prompt": "p4"})).status_code == 200


async def test_engine_failure_gives_503_and_health_says_why():
    app, engine = make(FakeEngine(max_model_len=CTX, fail_with="CUDA error: device lost"))
    async with asgi_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error" and "device lost" in health.json()["detail"]
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code == 503


class _Broken(FakeEngine):
    async def generate(self, request, **_):
        raise RuntimeError("segfault-ish surprise")


async def test_unexpected_engine_exception_is_a_503_not_a_500():
    app, _ = make(_Broken(max_model_len=CTX))
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 503 and "RuntimeError: segfault-ish surprise" in r.json()["error"]["message"]
        health = (await client.get("/health")).json()
        assert health["status"] == "error" and "segfault-ish surprise" in health["detail"]


async def test_health_while_loading_then_ready_and_failed_start():
    engine = FakeEngine(max_model_len=CTX, start_delay=0.2)
    app, _ = make(engine)
    async with lifespan(app), asgi_client(app) as client:
        loading = await client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code == 503
        await app.state.engine_task
        ok = await client.get("/health")
        assert ok.status_code == 200 and ok.json()["info"]["max_model_len"] == CTX
    app, _ = make(FakeEngine(start_error="no such model folder"))
    async with serving(app), asgi_client(app) as client:
        failed = await client.get("/health")
        assert failed.status_code == 503 and "no such model folder" in failed.json()["detail"]


async def test_metrics_count_requests_and_tokens():
    app, _ = make()
    async with asgi_client(app) as client:
        await client.post("/v1/chat/completions", json={"messages": HI, "negative_prompts": ["x"], "guidance_scale": 2})
        await client.post("/v1/completions", json={"prompt": "y", "model": "wrong"})
        text = (await client.get("/metrics")).text
    assert 'negspace_node_requests_total{endpoint="chat",mode="guided",outcome="ok"} 1.0' in text
    for name in ("negspace_node_prompt_tokens_total", "negspace_node_negative_prompt_tokens_total",
                 "negspace_node_completion_tokens_total", "negspace_node_generation_seconds_bucket",
                 "negspace_node_queue_depth"):
        assert name in text
    assert any('route="/v1/completions"' in line and 'status="404"' in line for line in text.splitlines())


async def test_node_client_contract_against_the_app():
    app, engine = make()
    async with NodeClient("http://node", transport=__import__("httpx").ASGITransport(app=app)) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [FAKE_MODEL_NAME] and models.data[0].max_model_len == CTX
        reply = await client.chat.create(ChatCompletionRequest(messages=HI, negative_prompts=["a", "b"],
                                                               guidance_scale=2.5, guidance_space="logprobs",
                                                               temperature=0, max_tokens=30))
        assert reply.text and reply.guidance.num_negatives == 2 and reply.guidance.space == "logprobs"
        assert engine.requests[-1].guidance.space == "logprobs" and engine.requests[-1].max_tokens == 30
        done = await client.completions.create(CompletionRequest(prompt="abc", max_tokens=5))
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
        assert (await client.health()).status == "ok"
        with pytest.raises(NotFoundError, match="does not exist"):
            await client.chat.create(ChatCompletionRequest(messages=HI, model="other"))
        engine.fail_with = "backend gone"
        with pytest.raises(ServiceUnavailableError, match="backend gone"):
            await client.completions.create(CompletionRequest(prompt="abc"))
        assert (await client.health()).status == "error"


async def test_node_client_sees_rate_limit():
    app, _ = make(FakeEngine(max_model_len=CTX, delay=0.3), max_queue=1)
    async with NodeClient("http://node", transport=__import__("httpx").ASGITransport(app=app)) as client:
        first = asyncio.create_task(client.completions.create(CompletionRequest(prompt="a")))
        while app.state.node.in_flight < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(RateLimitError) as caught:
            await client.completions.create(CompletionRequest(prompt="b"))
        assert caught.value.retry_after and caught.value.retry_after >= 1
        await first


async def test_openapi_documents_the_method_options():
    app, _ = make()
    async with asgi_client(app) as client:
        schema = (await client.get("/openapi.json")).json()
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name, says in (("guidance_combine", "mean or max"), ("guidance_alpha", "top token always survives"),
                       ("guidance_max_tokens", "0 = plain"), ("min_p", "before top_p")):
        assert says in fields[name]["description"], name
