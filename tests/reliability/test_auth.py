"""Issue 7, authentication: with a token set, each service's REAL app refuses a missing or wrong
``Authorization: Bearer`` on real routes (including /metrics, /docs, /openapi.json) with 401 and
the error envelope, lets the right token through, and leaves /health open. Without a token, each
service's settings bind to 127.0.0.1 by default."""

from __future__ import annotations

import importlib

import pytest

TOKEN = "s3cret-token"


def _node(tmp_path, **kw):
    from negspace_node.app import create_app
    from negspace_node.engines.fake import FakeEngine
    from negspace_node.settings import NodeSettings

    return create_app(NodeSettings(engine="fake", **kw), engine=FakeEngine())


def _controller(tmp_path, **kw):
    from negspace_controller.app import create_app
    from negspace_controller.settings import ControllerSettings
    from negspace_controller.testing import HashingFakeEmbedder

    return create_app(ControllerSettings(qdrant_path=":memory:", index_snapshots="off", **kw),
                      embedder=HashingFakeEmbedder(dimension=16))


def _orchestrator(tmp_path, **kw):
    from negspace_orchestrator.app import create_app
    from negspace_orchestrator.settings import OrchestratorSettings

    return create_app(OrchestratorSettings(db=tmp_path / "o.db", data_dir=tmp_path / "exports", **kw))


def _trainer(tmp_path, **kw):
    from negspace_trainer.app import create_app  # type: ignore[import-not-found]
    from negspace_trainer.settings import TrainerSettings

    # no job is ever created here (POST /jobs is refused or empty), so the worker stays idle
    return create_app(TrainerSettings(workdir=tmp_path / "trainer", **kw))


# (factory, a real GET route, a real POST route with a valid body)
SERVICES = {
    "node": (_node, "/v1/models", ("/v1/completions", {"prompt": "hi", "max_tokens": 4})),
    "controller": (_controller, "/collections/abc", ("/embed", {"texts": ["hello"]})),
    "orchestrator": (_orchestrator, "/runs", ("/runs", {"base_instruction": "Write a poem.", "rounds": 0})),
    "trainer": (_trainer, "/jobs", ("/jobs", {})),
}


@pytest.mark.parametrize("service", list(SERVICES))
async def test_token_required_everywhere_but_health(service, tmp_path, monkeypatch, running):
    monkeypatch.delenv("NEGSPACE_API_TOKEN", raising=False)
    factory, get_route, (post_route, body) = SERVICES[service]
    app = factory(tmp_path, api_token=TOKEN)
    async with running(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            for method, path in (("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                                 ("GET", get_route), ("POST", post_route)):
                r = await client.request(method, path, headers=headers, json=body if method == "POST" else None)
                assert r.status_code == 401, (service, method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers.get("WWW-Authenticate") == "Bearer"
        health = await client.get("/health")
        assert health.status_code in (200, 503), health.text  # open: ready or still loading, never 401
        ok = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert (await client.get(path, headers=ok)).status_code == 200, (service, path)
        r = await client.get(get_route, headers=ok)
        assert r.status_code != 401, (service, get_route, r.text)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_token_from_the_shared_environment_variable(service, tmp_path, monkeypatch, running):
    monkeypatch.setenv("NEGSPACE_API_TOKEN", TOKEN)
    factory, get_route, _ = SERVICES[service]
    async with running(factory(tmp_path)) as client:
        assert (await client.get(get_route)).status_code == 401
        assert (await client.get(get_route, headers={"Authorization": f"Bearer {TOKEN}"})).status_code != 401


@pytest.mark.parametrize("service", list(SERVICES))
async def test_no_token_no_auth(service, tmp_path, monkeypatch, running):
    monkeypatch.delenv("NEGSPACE_API_TOKEN", raising=False)
    factory, _, _ = SERVICES[service]
    async with running(factory(tmp_path)) as client:
        assert (await client.get("/openapi.json")).status_code == 200


@pytest.mark.parametrize("service,module,cls,prefix", [
    ("node", "negspace_node.settings", "NodeSettings", "NODE_"),
    ("controller", "negspace_controller.settings", "ControllerSettings", "CONTROLLER_"),
    ("orchestrator", "negspace_orchestrator.settings", "OrchestratorSettings", "ORCHESTRATOR_"),
    ("trainer", "negspace_trainer.settings", "TrainerSettings", "TRAINER_"),
])
def test_default_bind_is_loopback(service, module, cls, prefix, monkeypatch):
    monkeypatch.delenv("NEGSPACE_API_TOKEN", raising=False)
    monkeypatch.delenv(f"{prefix}HOST", raising=False)
    monkeypatch.delenv(f"{prefix}API_TOKEN", raising=False)
    settings = getattr(importlib.import_module(module), cls)()
    assert settings.host == "127.0.0.1" and settings.token is None
