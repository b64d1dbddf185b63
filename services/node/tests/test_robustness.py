"""No request can break a node (issue 12 items 1, 3, 4), against the real transformers engine on
the bundled 135M model (float32) where it matters, FakeEngine for the HTTP mechanics:

- extreme but schema-valid values (temperature 1e-30, guidance_scale 1e30 / 1e308) answer 200;
- a failure inside one request's draw fails that request alone (500 generation_error) and the
  engine serves the next one;
- a dead engine (its model breaks mid-request) answers 503, /health says why, the death callback
  fires (``python -m negspace_node`` exits 3 on it; checked in a real subprocess);
- a per-request deadline (503 + Retry-After) and a client disconnect abort the generation: the
  engine stops decoding for it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from negspace_node.app import create_app
from negspace_node.engines.fake import FakeEngine
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_node.testing import asgi_client, count_decode_steps, leave_after_three_steps, raw_post, serving

HI = [{"role": "user", "content": "Write a question about rivers."}]
NEGS = ["Write a question about lakes.", "Write a question about the sea."]


def fake_app(engine=None, on_engine_dead=None, **settings):
    engine = engine or FakeEngine(max_model_len=256)
    return create_app(NodeSettings(engine="fake", **settings), engine=engine, on_engine_dead=on_engine_dead), engine


# -- HTTP mechanics (FakeEngine, fast) ----------------------------------------------------------
async def test_deadline_aborts_the_request_with_503_and_retry_after():
    app, engine = fake_app(FakeEngine(max_model_len=256, delay=5.0), request_timeout_s=0.3)
    async with asgi_client(app) as client:
        started = time.monotonic()
        r = await client.post("/v1/completions", json={"prompt": "x"})
        assert time.monotonic() - started < 3
        assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded"
        assert "0.3 s" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
        assert engine.queue_depth() == 0 and app.state.node.in_flight == 0
        assert (await client.get("/health")).status_code == 200          # the engine is fine
        assert 'outcome="timeout"' in (await client.get("/metrics")).text


async def test_a_client_that_disconnects_cancels_its_generation():
    app, engine = fake_app(FakeEngine(max_model_len=256, delay=30.0))
    t0 = time.monotonic()
    status, ended = await raw_post(app, "/v1/completions", {"prompt": "x"},
                                   disconnect_when=lambda: time.monotonic() - t0 > 0.3)
    assert ended - t0 < 3 and status == 499
    assert engine.queue_depth() == 0 and app.state.node.in_flight == 0


async def test_a_dead_engine_calls_the_death_callback_after_the_grace_period():
    calls = []
    app, engine = fake_app(on_engine_dead=calls.append, engine_error_grace_s=0.3)
    async with serving(app), asgi_client(app) as client:
        await asyncio.sleep(0.3)
        assert calls == []                                   # a healthy engine: nothing happens
        engine.fail("CUDA error: device lost")
        await asyncio.sleep(0.1)
        health = await client.get("/health")                 # during the grace period /health says why
        assert health.status_code == 503 and "device lost" in health.json()["detail"]
        for _ in range(50):
            if calls:
                break
            await asyncio.sleep(0.05)
        assert calls == ["CUDA error: device lost"]


async def test_a_failed_start_also_calls_the_death_callback():
    calls = []
    app, _ = fake_app(FakeEngine(start_error="no such model"), on_engine_dead=calls.append,
                      engine_error_grace_s=0.0)
    async with serving(app):
        for _ in range(50):
            if calls:
                break
            await asyncio.sleep(0.05)
    assert calls == ["no such model"]


def test_the_node_process_exits_3_when_its_engine_cannot_run(tmp_path):
    """A real ``python -m negspace_node`` whose engine fails does not linger behind its port."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "negspace_node", "--engine", "transformers", "--model",
                           str(tmp_path / "missing"), "--port", "0", "--engine-error-grace-s", "0.2"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the engine died" in proc.stderr and "missing" in proc.stderr
    assert time.monotonic() - started < 180


# -- the real transformers engine ---------------------------------------------------------------
@pytest.fixture
def real_app(smol):
    model, tok = smol
    engine = TransformersEngine(NodeSettings(max_model_len=512), model=model, tokenizer=tok)
    calls: list[str] = []
    app = create_app(NodeSettings(engine="transformers", max_model_len=512, engine_error_grace_s=0.0),
                     engine=engine, on_engine_dead=calls.append)
    app.state.death_calls = calls
    return app, engine


@pytest.mark.slow
async def test_extreme_schema_valid_values_answer_200_and_the_engine_lives(real_app):
    app, engine = real_app
    async with serving(app), asgi_client(app) as client:
        await engine.start()
        for extra in ({"temperature": 1e-30, "guidance_scale": 1e30},
                      {"temperature": 2.0, "guidance_scale": 1.7976931348623157e308, "top_p": 1e-300},
                      {"temperature": 1e-6, "guidance_scale": 1e-300, "guidance_space": "logprobs",
                       "guidance_combine": "max", "guidance_alpha": 1.0, "min_p": 1.0},
                      {"temperature": 0.5, "guidance_scale": 1e38, "guidance_combine": "mean", "seed": 2**63 - 1}):
            r = await client.post("/v1/chat/completions", json={"messages": HI, "negative_prompts": NEGS,
                                                                 "max_tokens": 4, **extra})
            assert r.status_code == 200, (extra, r.text)
            assert r.json()["usage"]["completion_tokens"] >= 1
        # 1e-30 is greedy: the same text as temperature 0
        a, b = [await client.post("/v1/chat/completions", json={"messages": HI, "negative_prompts": NEGS,
                                                                  "max_tokens": 6, "guidance_scale": 3,
                                                                  "temperature": t, "seed": s})
                for t, s in ((0, 1), (1e-30, 2))]
        assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
        assert (await client.get("/health")).status_code == 200
    assert engine.state == "ready" and app.state.death_calls == []


@pytest.mark.slow
async def test_a_failing_draw_fails_that_request_alone(real_app, monkeypatch):
    import negspace_node.engines.transformers as module
    import torch

    app, engine = real_app
    real = module.guided_batch

    def poisoned(logits, steps):
        out = real(logits, steps)
        return torch.full_like(out, float("nan")) if steps[0].temperature == 1.25 else out

    monkeypatch.setattr(module, "guided_batch", poisoned)
    async with serving(app), asgi_client(app) as client:
        await engine.start()
        body = {"messages": HI, "negative_prompts": NEGS, "max_tokens": 4, "guidance_scale": 3}
        bad = await client.post("/v1/chat/completions", json={**body, "seed": 666, "temperature": 1.25})
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "generation_error"
        assert "no token has a finite score" in bad.json()["error"]["message"]
        good = await client.post("/v1/chat/completions", json={**body, "seed": 1})
        assert good.status_code == 200 and (await client.get("/health")).status_code == 200
    assert engine.state == "ready" and app.state.death_calls == []


@pytest.mark.slow
async def test_a_model_that_breaks_mid_request_kills_the_engine_loudly(real_app, monkeypatch):
    app, engine = real_app
    model = engine._model
    forward = model.forward
    calls = []

    def breaking(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", breaking)
    async with serving(app), asgi_client(app) as client:
        await engine.start()
        r = await client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 30, "temperature": 0})
        assert r.status_code == 503 and "illegal memory access" in r.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and "illegal memory access" in health.json()["detail"]
        for _ in range(50):
            if app.state.death_calls:
                break
            await asyncio.sleep(0.05)
    assert len(app.state.death_calls) == 1 and "illegal memory access" in app.state.death_calls[0]


@pytest.mark.slow
async def test_an_abandoned_request_stops_consuming_steps(real_app, monkeypatch):
    app, engine = real_app
    steps = count_decode_steps(monkeypatch)
    async with serving(app):
        await engine.start()
        status = await leave_after_three_steps(app, engine, steps, {"messages": HI, "negative_prompts": NEGS,
                                                                    "guidance_scale": 2})
        assert status == 499
