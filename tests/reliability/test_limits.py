"""Issue 7, limits: every limit of every service answers a clear 4xx that names what to fix:
413 for a body over ``max_body_bytes`` (by Content-Length and while streaming), 422/400 for list
lengths, ``max_tokens``, run sizes, and the node's 429 + ``Retry-After`` when its queue is full.
The values come from the contracts' constants and each service's settings (docs/reliability.md
lists them)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from negspace_contracts.controller import MAX_POINTS_PER_UPSERT, MAX_TEXTS_PER_EMBED
from negspace_contracts.node import MAX_NEGATIVES, MAX_STOP_SEQUENCES
from negspace_contracts.orchestrator import MAX_BASELINE_SIZE, MAX_NODES, MAX_ROUNDS, MAX_RUN_INSTRUCTIONS
from negspace_contracts.trainer import MAX_INLINE_RECORDS, JobRequest
from pydantic import ValidationError

SMALL_BODY = 4096


def node_app(**kw):
    from negspace_node.app import create_app
    from negspace_node.engines.fake import FakeEngine
    from negspace_node.settings import NodeSettings

    engine_kw = {k: kw.pop(k) for k in ("delay", "max_model_len") if k in kw}
    return create_app(NodeSettings(engine="fake", **kw), engine=FakeEngine(**engine_kw))


def controller_app(**kw):
    from negspace_controller.app import create_app
    from negspace_controller.settings import ControllerSettings
    from negspace_controller.testing import HashingFakeEmbedder

    return create_app(ControllerSettings(qdrant_path=":memory:", index_snapshots="off", **kw),
                      embedder=HashingFakeEmbedder(dimension=16))


def orchestrator_app(tmp_path, **kw):
    from negspace_orchestrator.app import create_app
    from negspace_orchestrator.settings import OrchestratorSettings

    return create_app(OrchestratorSettings(db=tmp_path / "o.db", data_dir=tmp_path / "e", **kw))


def assert_error(r: httpx.Response, status: int, param: str | None = None, says: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if says is not None:
        assert says in err["message"], err


async def _chunks(n: int):
    for _ in range(n):
        yield b"x" * 1024


# ---- request body size: 413 on every service --------------------------------------------------
@pytest.mark.parametrize("service,route", [("node", "/v1/completions"), ("controller", "/embed"),
                                           ("orchestrator", "/runs")])
async def test_body_over_max_body_bytes_is_413(service, route, tmp_path, running):
    app = {"node": lambda: node_app(max_body_bytes=SMALL_BODY),
           "controller": lambda: controller_app(max_body_bytes=SMALL_BODY),
           "orchestrator": lambda: orchestrator_app(tmp_path, max_body_bytes=SMALL_BODY)}[service]()
    async with running(app) as client:
        big = b'{"prompt": "' + b"a" * (SMALL_BODY + 10) + b'"}'
        r = await client.post(route, content=big, headers={"content-type": "application/json"})
        assert_error(r, 413, says=f"{SMALL_BODY} bytes")
        # no Content-Length (chunked): refused while reading, not after buffering everything
        r = await client.post(route, content=_chunks(64), headers={"content-type": "application/json"})
        assert_error(r, 413)
        # just under the limit still reaches validation (a 4xx about the body, not 413)
        r = await client.post(route, content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code in (200, 201, 400, 422), r.text


def test_max_body_bytes_setting_floor():
    from negspace_node.settings import NodeSettings

    assert NodeSettings().max_body_bytes == 16 * 1024 * 1024
    with pytest.raises(ValidationError):
        NodeSettings(max_body_bytes=10)


# ---- node ------------------------------------------------------------------------------------
HI = [{"role": "user", "content": "Write a question about rivers."}]


async def test_node_list_lengths_and_max_tokens(running):
    async with running(node_app(max_model_len=256)) as c:
        ok = await c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 8,
                                                         "negative_prompts": ["lakes"] * MAX_NEGATIVES,
                                                         "guidance_scale": 2})
        assert ok.status_code == 200, ok.text
        r = await c.post("/v1/chat/completions", json={"messages": HI, "negative_prompts": ["lakes"] * (MAX_NEGATIVES + 1)})
        assert_error(r, 422, "negative_prompts", says=str(MAX_NEGATIVES))
        r = await c.post("/v1/chat/completions", json={"messages": HI, "stop": ["x"] * (MAX_STOP_SEQUENCES + 1)})
        assert_error(r, 422, "stop", says=str(MAX_STOP_SEQUENCES))
        r = await c.post("/v1/completions", json={"prompt": "hi", "n": 17})
        assert_error(r, 422, "n")
        r = await c.post("/v1/chat/completions", json={"messages": HI, "n": 2, "negative_prompts": ["x"]})
        assert_error(r, 422, says="n must be 1")
        r = await c.post("/v1/chat/completions", json={"messages": []})
        assert_error(r, 422, "messages")
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
        assert_error(r, 422, "max_tokens")
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 257})
        assert_error(r, 400, "max_tokens", says="256")
        r = await c.post("/v1/completions", json={"prompt": "a" * 100, "max_tokens": 200})
        assert_error(r, 400, "max_tokens", says="max_tokens <=")
        r = await c.post("/v1/completions", json={"prompt": "a" * 300})
        assert_error(r, 400, "prompt", says="shorten it")
        r = await c.post("/v1/completions", json={"prompt": "hi", "negative_prompts": ["a" * 300], "guidance_scale": 2})
        assert_error(r, 400, "negative_prompts[0]")


async def test_node_full_queue_is_429_with_retry_after(running):
    app = node_app(max_queue=2, delay=0.5)
    async with running(app) as c:
        replies = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4})
                                         for i in range(5)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200, 429, 429, 429], codes
        for r in replies:
            if r.status_code == 429:
                assert_error(r, 429, says="capacity")
                assert int(r.headers["Retry-After"]) >= 1
        assert app.state.node.in_flight == 0  # nothing left counted once answered
        assert (await c.post("/v1/completions", json={"prompt": "again", "max_tokens": 4})).status_code == 200


# ---- controller ------------------------------------------------------------------------------
async def test_controller_list_lengths_and_k(running):
    async with running(controller_app(knn_capacity=8)) as c:
        assert (await c.put("/collections/lim")).status_code == 201
        pts = [{"id": i, "text": f"text number {i}"} for i in range(MAX_POINTS_PER_UPSERT + 1)]
        assert_error(await c.post("/collections/lim/points", json={"points": pts}), 422, "points")
        assert_error(await c.post("/collections/lim/points", json={"points": []}), 422, "points")
        r = await c.post("/collections/lim/points", json={"points": pts[:MAX_POINTS_PER_UPSERT]})
        assert r.status_code == 200, r.text
        assert_error(await c.post("/collections/lim/points/delete",
                                  json={"ids": list(range(MAX_POINTS_PER_UPSERT + 1))}), 422, "ids")
        assert_error(await c.post("/embed", json={"texts": ["a"] * (MAX_TEXTS_PER_EMBED + 1)}), 422, "texts")
        assert_error(await c.post("/embed", json={"texts": []}), 422, "texts")
        assert_error(await c.post("/collections/lim/similar", json={"text": "a", "k": 1001}), 422, "k")
        assert_error(await c.post("/collections/lim/dense", json={"k": 1001}), 422, "k")
        assert_error(await c.post("/collections/lim/dense", json={"knn": 101}), 422, "knn")
        r = await c.post("/collections/lim/dense", json={"k": 3, "knn": 9})
        assert_error(r, 400, says="--knn-capacity")
        r = await c.put("/collections/" + "a" * 129)
        assert r.status_code in (400, 422), r.text


# ---- orchestrator ----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,param", [
    ("nodes", MAX_NODES + 1, "nodes"),
    ("rounds", MAX_ROUNDS + 1, "rounds"),
    ("max_tokens", 4097, "max_tokens"),
    ("max_tokens", 0, "max_tokens"),
    ("base_instruction", "x" * 8001, "base_instruction"),
    ("augmentation_prompt", "x" * 8001, "augmentation_prompt"),
    ("negatives", {"k": 17}, "negatives.k"),
    ("guidance", {"max_retries": 51}, "guidance.max_retries"),
])
async def test_orchestrator_run_size_limits(field, value, param, tmp_path, running):
    async with running(orchestrator_app(tmp_path)) as c:
        body = {"base_instruction": "Write a poem.", field: value}
        assert_error(await c.post("/runs", json=body), 422, param)


async def test_orchestrator_run_instructions_limit(tmp_path, running):
    """Each cap alone allows more than one collection is measured to hold: their product is capped."""
    assert MAX_NODES * (MAX_ROUNDS + 1) > MAX_RUN_INSTRUCTIONS
    rounds = MAX_RUN_INSTRUCTIONS // MAX_NODES  # MAX_NODES x (rounds + 1) is just over the cap
    async with running(orchestrator_app(tmp_path)) as c:
        r = await c.post("/runs", json={"base_instruction": "Write a poem.", "nodes": MAX_NODES, "rounds": rounds})
        assert_error(r, 422, says="nodes x (rounds + 1)")
        r = await c.post("/runs", json={"base_instruction": "Write a poem.", "nodes": MAX_NODES, "rounds": rounds - 1})
        assert r.status_code == 201, r.text
        assert (await c.post(f"/runs/{r.json()['id']}/cancel")).status_code in (200, 202), "cancel the large run"


async def test_orchestrator_baseline_size_and_request_limits(tmp_path, running):
    async with running(orchestrator_app(tmp_path)) as c:
        r = await c.post("/runs", json={"base_instruction": "x", "mode": "baseline", "size": MAX_BASELINE_SIZE + 1})
        assert_error(r, 422, "size")
        r = await c.post("/runs", json={"base_instruction": "x", "mode": "baseline", "match_run": "nope"})
        assert_error(r, 400, "match_run")
        created = await c.post("/runs", json={"base_instruction": "Write a poem.", "rounds": 0})
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        assert_error(await c.post(f"/runs/{rid}/qa", json={"max_tokens": 4097}), 422, "max_tokens")
        assert_error(await c.post(f"/runs/{rid}/train", json={"training": {"batch_size": 1025}}), 422,
                     "training.batch_size")
        assert_error(await c.get("/runs/nope/events", params={"after": -1}), 422, "after")


# ---- trainer (contract level until its app lands) ---------------------------------------------
def test_trainer_inline_dataset_limit():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValidationError, match="records"):
        JobRequest.model_validate({"dataset": {"records": [record] * (MAX_INLINE_RECORDS + 1)}})
