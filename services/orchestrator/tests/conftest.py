"""Mock node, controller and trainer services built from the contract models, and helpers to
run the orchestrator against them in-process (httpx.ASGITransport) or over real sockets.

The mocks are real HTTP handlers of the contracts (FastAPI apps that parse and return the
``negspace_contracts`` models), small enough to script: the node returns texts chosen by a
function of the request; the controller keeps an exact cosine store over a deterministic
bag-of-words vector, so "similar" means what it says.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from negspace_contracts.controller import (
    AcceptRequest,
    AcceptResponse,
    CollectionComparison,
    CollectionInfo,
    CompareRequest,
    CompareResponse,
    DenseItem,
    DenseRequest,
    DenseResponse,
    EmbedRequest,
    EmbedResponse,
    MapPoint,
    MetricsRequest,
    MetricsResponse,
    Neighbor,
    SimilarRequest,
    SimilarResponse,
    UpsertPointsRequest,
    UpsertPointsResponse,
)
from negspace_contracts.node import (
    ChatChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    GuidanceInfo,
    Usage,
)
from negspace_contracts.orchestrator import OrchestratorClient
from negspace_contracts.trainer import Job, JobCreated, JobList, JobRequest
from negspace_orchestrator.app import create_app
from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_servekit.testing import free_port, lifespan

VOCAB = [f"w{i}" for i in range(400)]


def seeded_text(seed: int, n: int = 10) -> str:
    """A text that only a request with the same seed produces (near-orthogonal to the others)."""
    return " ".join(random.Random(seed).sample(VOCAB, n))


def default_script(req: ChatCompletionRequest) -> str:
    return seeded_text(req.seed or 0)


def unavailable(message: str = "mock is down") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "service_unavailable", "param": None,
                                   "code": 503}}, status_code=503)


@dataclass
class CallLog:
    """Every call the mocks answered, in order, across all mocks sharing the log."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]


class MockNode:
    def __init__(self, log: CallLog, name: str = "node", script: Callable[[ChatCompletionRequest], str] = default_script,
                 delay: float = 0.0) -> None:
        self.log, self.name, self.script, self.delay = log, name, script, delay
        self.requests: list[ChatCompletionRequest] = []
        self.down = False
        self.fail_next = 0
        self.reject_with: str | None = None
        self.rejected = 0
        app = FastAPI()

        @app.get("/health")
        async def health():
            if self.down:
                return unavailable()
            return {"status": "ok", "service": "node"}

        @app.post("/v1/chat/completions")
        async def chat(req: ChatCompletionRequest):
            if self.down:
                return unavailable(f"{self.name} is down")
            if self.reject_with:
                self.rejected += 1
                return JSONResponse({"error": {"message": self.reject_with, "type": "invalid_request_error",
                                               "param": None, "code": 400}}, status_code=400)
            if self.fail_next > 0:
                self.fail_next -= 1
                return unavailable(f"{self.name} failed once")
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.down:
                return unavailable(f"{self.name} died mid-request")
            self.requests.append(req)
            text = self.script(req)
            self.log.calls.append(("generate", {"node": self.name, "negatives": list(req.negative_prompts),
                                                "scale": req.guidance_scale, "seed": req.seed, "text": text}))
            ntok = len(text.split())
            # a word is a token here: as long as max_tokens means the generation was cut there
            cut = req.max_tokens is not None and ntok >= req.max_tokens
            return ChatCompletionResponse(
                model="mock", choices=[ChatChoice(index=0, message=ChatCompletionMessage(content=text),
                                                  finish_reason="length" if cut else "stop")],
                usage=Usage(prompt_tokens=10, completion_tokens=ntok, total_tokens=10 + ntok),
                guidance=GuidanceInfo(scale=req.guidance_scale, num_negatives=len(req.negative_prompts)))

        self.app = app


def text_vector(text: str, dim: int = 512) -> list[float]:
    v = [0.0] * dim
    for tok in text.lower().split():
        h = int.from_bytes(hashlib.sha256(tok.encode()).digest()[:4], "big")
        v[h % dim] += 1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


class MockController:
    def __init__(self, log: CallLog, similar_delay: float = 0.0) -> None:
        self.log = log
        self.similar_delay = similar_delay
        self.collections: dict[str, dict[str, tuple[str, list[float], dict]]] = {}
        self.dense_responses: list[list[str]] = []
        self.upserts = 0
        self.down = False
        app = FastAPI()

        @app.middleware("http")
        async def outage(request, call_next):
            if self.down:
                return unavailable("controller is down")
            return await call_next(request)

        @app.get("/health")
        async def health():
            return {"status": "ok", "service": "controller"}

        @app.post("/embed")
        async def embed(req: EmbedRequest):
            self.log.calls.append(("embed", list(req.texts)))
            return EmbedResponse(embeddings=[text_vector(t) for t in req.texts], truncated=[False] * len(req.texts))

        @app.put("/collections/{name}")
        async def create(name: str):
            self.log.calls.append(("create", name))
            self.collections.setdefault(name, {})
            return CollectionInfo(name=name, count=len(self.collections[name]), dimension=512, embedder="bow")

        @app.post("/collections/{name}/points")
        async def upsert(name: str, req: UpsertPointsRequest):
            col = self.collections[name]
            for p in req.points:
                col[str(p.id)] = (p.text, text_vector(p.text), p.payload)
                self.log.calls.append(("upsert", {"id": str(p.id), "text": p.text}))
            self.upserts += len(req.points)
            return UpsertPointsResponse(ids=[p.id for p in req.points], truncated=[False] * len(req.points))

        @app.post("/collections/{name}/similar")
        async def similar(name: str, req: SimilarRequest):
            col = self.collections[name]
            v = text_vector(req.text)
            if self.similar_delay:
                await asyncio.sleep(self.similar_delay)
            scored = sorted(((cosine(v, vec), pid, t) for pid, (t, vec, _) in col.items()), reverse=True)[:req.k]
            best = scored[0][0] if scored else None
            self.log.calls.append(("similar", {"text": req.text, "max": best, "quantile": req.threshold_quantile}))
            return SimilarResponse(neighbors=[Neighbor(id=uuid.UUID(pid), text=t, score=s) for s, pid, t in scored],
                                   max_similarity=best, is_similar=best is not None and best >= req.threshold)

        @app.post("/collections/{name}/accept")
        async def accept(name: str, req: AcceptRequest):
            """The check and the insert with nothing awaited between them (atomic here as the real
            controller's write lock makes them); logged as those two steps. A point stored under
            the request's own id (a replayed slot) is left out of its check."""
            col = self.collections[name]
            if self.similar_delay:
                await asyncio.sleep(self.similar_delay)
            p = req.point
            v = text_vector(p.text)
            scored = sorted(((cosine(v, vec), pid, t) for pid, (t, vec, _) in col.items() if pid != str(p.id)),
                            reverse=True)[:req.k]
            best = scored[0][0] if scored else None
            similar = best is not None and best >= req.threshold
            self.log.calls.append(("similar", {"text": p.text, "max": best, "quantile": req.threshold_quantile}))
            accepted = not similar or req.force
            if accepted:
                col[str(p.id)] = (p.text, v, p.payload)
                self.log.calls.append(("upsert", {"id": str(p.id), "text": p.text}))
                self.upserts += 1
            return AcceptResponse(neighbors=[Neighbor(id=uuid.UUID(pid), text=t, score=s) for s, pid, t in scored],
                                  max_similarity=best, is_similar=similar, accepted=accepted)

        @app.post("/collections/{name}/dense")
        async def dense(name: str, req: DenseRequest):
            col = self.collections[name]
            items = list(col.items())
            scored = []
            for pid, (t, vec, _) in items:
                sims = sorted((cosine(vec, v2) for p2, (_, v2, _) in items if p2 != pid), reverse=True)[:req.knn]
                scored.append((sum(sims) / len(sims) if sims else 0.0, pid, t))
            scored.sort(key=lambda x: (-x[0], x[1]))
            chosen = scored[:req.k]
            self.dense_responses.append([t for _, _, t in chosen])
            self.log.calls.append(("dense", [t for _, _, t in chosen]))
            return DenseResponse(items=[DenseItem(id=uuid.UUID(pid), text=t, density=d) for d, pid, t in chosen])

        @app.post("/collections/{name}/metrics")
        async def metrics(name: str, req: MetricsRequest):
            col = self.collections.get(name, {})
            pts = [t for t, _, p in col.values()
                   if not req.filter or all(p.get(k) == v for k, v in req.filter.items())]
            words = [w for t in pts for w in t.split()]
            return MetricsResponse(n=len(pts), semantic_diversity=0.5, mst_diversity=0.5, hull_volume=None,
                                   vendi_score=float(len(pts)), distinct_1=len(set(words)) / max(1, len(words)),
                                   distinct_2=None)

        @app.post("/compare")
        async def compare(req: CompareRequest):
            """Counts and a stand-in map (two vector coordinates); the real numbers are the
            controller's, tested there."""
            self.log.calls.append(("compare", {"a": req.a, "b": req.b, "group_by": req.group_by}))

            def side(name: str) -> CollectionComparison | None:
                col = self.collections.get(name)
                if col is None:
                    return None
                pts = list(col.values())
                groups = sorted({p.get(req.group_by) for _, _, p in pts}) if req.group_by else []
                return CollectionComparison(
                    name=name, metrics=MetricsResponse(n=len(pts), semantic_diversity=0.5, mst_diversity=None,
                                                       hull_volume=None, vendi_score=None, distinct_1=None,
                                                       distinct_2=None),
                    groups={str(g): MetricsResponse(n=sum(p.get(req.group_by) == g for _, _, p in pts),
                                                    semantic_diversity=None, mst_diversity=None, hull_volume=None,
                                                    vendi_score=None, distinct_1=None, distinct_2=None)
                            for g in groups},
                    points=[MapPoint(id=uuid.UUID(pid), x=vec[0], y=vec[1], group=p.get(req.group_by))
                            for pid, (_, vec, p) in col.items()])

            a, b = side(req.a), side(req.b)
            if a is None or b is None:
                return JSONResponse({"error": {"message": "no such collection", "type": "not_found",
                                               "param": None, "code": 404}}, status_code=404)
            return CompareResponse(a=a, b=b, pca_basis="shared")

        self.app = app

    def texts(self, collection: str | None = None) -> list[str]:
        cols = [self.collections[collection]] if collection else list(self.collections.values())
        return [t for c in cols for t, _, _ in c.values()]


class MockTrainer:
    """Jobs are ``running`` on their first poll and ``succeeded`` from the second; ``delay`` slows
    every answer (for timeouts, over real sockets); an unknown job is a 404. ``idempotency_key``
    as the real trainer: the same key and request return the first job (200), another request
    under a used key is a 409. ``lose_answers``: exceptions raised AFTER the next POST /jobs
    calls did their work (through ASGITransport they reach the client as a timeout or a dropped
    connection, exactly as if the answer was lost on the wire); ``answer_delay`` does the same over
    real sockets (the job is made, then the answer comes too late)."""

    def __init__(self, delay: float = 0.0, running_polls: int = 1) -> None:
        self.running_polls = running_polls  # polls a job answers "running" before "succeeded"
        self.jobs: dict[str, tuple[JobRequest, int]] = {}
        self.keys: dict[str, str] = {}
        self.creates = 0  # POST /jobs calls, replays included
        self.lose_answers: list[Exception] = []
        self.delay = delay
        self.answer_delay = 0.0  # POST /jobs: seconds between creating the job and answering
        app = FastAPI()

        @app.middleware("http")
        async def slow(request, call_next):
            if self.delay:
                await asyncio.sleep(self.delay)
            return await call_next(request)

        @app.get("/health")
        async def health():
            return {"status": "ok", "service": "trainer"}

        @app.post("/jobs", status_code=201)
        async def create(req: JobRequest, response: Response):
            self.creates += 1
            key = req.idempotency_key
            if key is not None and key in self.keys:
                jid = self.keys[key]
                first = self.jobs[jid][0]
                if first.model_dump(exclude={"idempotency_key"}) != req.model_dump(exclude={"idempotency_key"}):
                    return JSONResponse({"error": {"message": f"idempotency_key {key!r} was already used for "
                                                              f"job {jid}, created from a different request",
                                                   "type": "conflict_error", "param": "idempotency_key",
                                                   "code": 409}}, status_code=409)
                response.status_code = 200
                created = JobCreated(id=jid, status="queued", replayed=True)
            else:
                jid = f"job-{len(self.jobs) + 1}"
                self.jobs[jid] = (req, 0)
                if key is not None:
                    self.keys[key] = jid
                created = JobCreated(id=jid, status="queued")
            if self.answer_delay:
                await asyncio.sleep(self.answer_delay)
            if self.lose_answers:
                raise self.lose_answers.pop(0)
            return created

        @app.get("/jobs")
        async def list_jobs(idempotency_key: str | None = None):
            if idempotency_key is None:
                ids = list(self.jobs)
            else:
                ids = [self.keys[idempotency_key]] if idempotency_key in self.keys else []
            return JobList(jobs=[self._job(jid) for jid in ids if jid in self.jobs])

        @app.get("/jobs/{jid}")
        async def get(jid: str):
            if jid not in self.jobs:
                return JSONResponse({"error": {"message": f"no job {jid}", "type": "not_found_error",
                                               "param": None, "code": 404}}, status_code=404)
            req, polls = self.jobs[jid]
            self.jobs[jid] = (req, polls + 1)
            return self._job(jid, polls)

        self.app = app

    def _job(self, jid: str, polls: int | None = None) -> Job:
        req, seen = self.jobs[jid]
        polls = seen if polls is None else polls
        return Job(id=jid, status="succeeded" if polls >= self.running_polls else "running", request=req,
                   name=req.name)


NODE_URLS = ["http://node-a", "http://node-b"]
CONTROLLER_URL = "http://controller"
CONTROLLER_URLS = [CONTROLLER_URL, "http://controller-1", "http://controller-2"]  # replicas, as n_controllers
TRAINER_URL = "http://trainer"


@dataclass
class Harness:
    log: CallLog
    nodes: list[MockNode]
    controller: MockController  # the first replica (the only one unless n_controllers > 1)
    trainer: MockTrainer
    settings: OrchestratorSettings
    client: OrchestratorClient
    app: FastAPI
    controllers: dict[str, MockController] = field(default_factory=dict)  # URL -> replica

    @property
    def orch(self):
        return self.app.state.orchestrator

    async def wait(self, run_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            run = await self.client.runs.get(run_id)
            if run.status in statuses:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run.status} after {timeout}s: {run}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def harness(tmp_path, *, n_urls: int = 1, script=default_script, node_delay: float = 0.0,
                  similar_delay: float = 0.0, node_apps: list | None = None,
                  controller_app: FastAPI | None = None, trainer: MockTrainer | None = None,
                  n_controllers: int = 1, controllers: dict[str, MockController] | None = None,
                  **settings_kw):
    """``n_controllers``: that many controller replicas (CONTROLLER_URLS); ``controllers``: the
    replicas by URL instead (the same objects across two harnesses = a controller that outlives an
    orchestrator restart); ``controller_url=[...]`` in ``settings_kw`` may list fewer or others."""
    log = CallLog()
    nodes = [MockNode(log, name=f"node-{i}", script=script, delay=node_delay) for i in range(n_urls)]
    if controllers is None:
        controllers = {u: MockController(log, similar_delay=similar_delay) for u in CONTROLLER_URLS[:n_controllers]}
    controller = next(iter(controllers.values()))
    trainer = trainer or MockTrainer()
    kw = dict(node_url=NODE_URLS[:n_urls], controller_url=list(controllers), trainer_url=TRAINER_URL,
              db=tmp_path / "orch.db", data_dir=tmp_path / "exports", retry_attempts=3,
              retry_backoff_s=0.01, retry_max_backoff_s=0.02, health_interval_s=0.1)
    kw.update(settings_kw)
    settings = OrchestratorSettings(**kw)
    apps = node_apps or [n.app for n in nodes]
    transports = {u: httpx.ASGITransport(a) for u, a in zip(NODE_URLS, apps, strict=False)}
    for url, ctl in controllers.items():
        transports[url] = httpx.ASGITransport(ctl.app)
    if controller_app is not None:
        transports[next(iter(controllers))] = httpx.ASGITransport(controller_app)
    transports[TRAINER_URL] = httpx.ASGITransport(trainer.app)
    deps = Dependencies(settings, transports=transports)
    app = create_app(settings, deps=deps)
    async with lifespan(app):
        client = OrchestratorClient("http://orchestrator", transport=httpx.ASGITransport(app))
        try:
            yield Harness(log, nodes, controller, trainer, settings, client, app, controllers)
        finally:
            await client.aclose()
            await deps.aclose()


@pytest.fixture
def make_harness(tmp_path):
    def factory(**kw):
        return harness(tmp_path, **kw)
    return factory


# ---- real sockets (for the orchestrator as a subprocess) -----------------------------------------
class ThreadServer:
    """A uvicorn server on 127.0.0.1 in a background thread (its own event loop)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("mock server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
