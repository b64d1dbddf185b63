"""A fake orchestrator app built from the contract models, for the CLI's unit tests.

FakeOrchestrator completes a run the moment it is created (instructions are seeded word lists),
keeps an event log served as server-sent events, converts Q/A, trains with jobs that finish after
a few polls, and compares two runs (``GET /runs/{id}/compare``) with real (numpy) semantic diversity
of bag-of-words vectors, recording every comparison and MetricsRequest.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from negspace_contracts.controller import MetricsRequest, MetricsResponse
from negspace_contracts.orchestrator import (
    Instruction,
    OrchestratorClient,
    QARequest,
    QAResult,
    RoundPoint,
    Run,
    RunComparison,
    RunConfig,
    RunCreated,
    RunDiversity,
    RunList,
    RunProgress,
    TrainRequest,
)
from negspace_contracts.trainer import ChatRecord, Job, JobEval, JobProgress, LossPoint

VOCAB = [f"w{i}" for i in range(300)]
DIM = 64


def text_for(seed: int) -> str:
    return " ".join(random.Random(seed).sample(VOCAB, 8))


def embed(text: str) -> list[float]:
    v = np.zeros(DIM)
    for w in text.split():
        v[int(hashlib.sha1(w.encode()).hexdigest(), 16) % DIM] += 1.0
    return (v / max(np.linalg.norm(v), 1e-12)).tolist()


def semantic_diversity(vecs: list[list[float]]) -> float | None:
    x = np.asarray(vecs)
    if len(x) < 2:
        return None
    s = x @ x.T
    n = len(x)
    return float(1 - (s.sum() - np.trace(s)) / (n * (n - 1)))


def err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "x", "param": None, "code": status}},
                        status_code=status)


@dataclass
class FakeState:
    runs: dict[str, Run] = field(default_factory=dict)
    instructions: dict[str, list[Instruction]] = field(default_factory=dict)
    events: dict[str, list[dict]] = field(default_factory=dict)
    qa: dict[str, list[ChatRecord]] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    job_polls: dict[str, int] = field(default_factory=dict)
    train_requests: dict[str, TrainRequest] = field(default_factory=dict)
    list_calls: list[str] = field(default_factory=list)
    metrics_requests: list[tuple[str, MetricsRequest | None]] = field(default_factory=list)
    compare_requests: list[tuple[str, str]] = field(default_factory=list)  # (run, with) per GET /compare
    compare_down: bool = False  # GET /runs/{id}/compare answers 503 (the controller is away)
    fail_run: bool = False
    fail_train: bool = False
    qa_rejections: dict[str, int] = field(default_factory=dict)  # reported by every POST /qa
    qa_none: bool = False  # POST /qa rejects every instruction; then, like the real one, GET /qa is a 409
    seed_requests: dict[str, TrainRequest] = field(default_factory=dict)  # "run" or "run@seed" -> request
    seed_jitter: dict[tuple[str, int | None], float] = field(default_factory=dict)  # added to a job's score
    exports: list[tuple[str, str]] = field(default_factory=list)  # (run id, format) per GET /export


def fake_orchestrator(state: FakeState) -> FastAPI:
    app = FastAPI()

    def add_event(rid: str, type_: str, data: dict) -> None:
        log = state.events.setdefault(rid, [])
        log.append({"type": type_, "run_id": rid, "seq": len(log) + 1, "data": data})

    @app.get("/health")
    async def health():
        return {"status": "ok", "service": "orchestrator"}

    @app.post("/runs", status_code=201)
    async def create(req: Request):
        try:
            cfg = RunConfig.model_validate(await req.json())
        except ValueError as exc:
            return err(422, str(exc))
        rid = f"run-{len(state.runs) + 1}"
        if cfg.mode == "baseline":
            if cfg.match_run not in state.runs and cfg.size is None:
                return err(400, f"unknown match_run {cfg.match_run}")
            n = cfg.size or state.runs[cfg.match_run].progress.accepted
        else:
            n = cfg.nodes * (cfg.rounds + 1)
        add_event(rid, "status", {"status": "running"})
        instrs, attempts = [], 0
        for i in range(n):
            node, rnd = i % cfg.nodes, i // cfg.nodes
            seed = hash((rid, i)) % 10_000
            scale = None if cfg.mode == "baseline" else (1.0 if rnd == 0 else 1.0 + 0.5 * (i % 3))
            tries = 1 if cfg.mode == "baseline" or rnd == 0 else 1 + i % 3
            for a in range(tries):
                attempts += 1
                add_event(rid, "attempt", {"node": node, "round": rnd, "attempt": a,
                                           "scale": None if scale is None else 1.0 + 0.5 * a,
                                           "accepted": a == tries - 1, "text": text_for(seed)})
            t = text_for(seed)
            instrs.append(Instruction(id=f"{rid}-{i}", node=node, round=rnd, text=t, guidance_scale=scale,
                                      attempt=tries - 1, max_similarity=None if rnd == 0 else 0.5))
            if node == cfg.nodes - 1 or i == n - 1:
                add_event(rid, "round", {"round": rnd, "rounds": cfg.rounds, "accepted": i + 1, "attempts": attempts})
        status = "failed" if state.fail_run else "completed"
        add_event(rid, "status", {"status": status, "accepted": n, "attempts": attempts})
        state.instructions[rid] = instrs
        state.runs[rid] = Run(id=rid, status=status, mode=cfg.mode, config=cfg, collection=f"c-{rid}",
                              error="boom" if state.fail_run else None,
                              progress=RunProgress(round=cfg.rounds, rounds=cfg.rounds, accepted=n,
                                                   attempts=attempts, target=n))
        return RunCreated(id=rid, status="queued").model_dump()

    @app.get("/runs")
    async def list_runs(limit: int = 100, after: str | None = None):
        # pages in creation order, like the orchestrator's
        runs = list(state.runs.values())
        start = [r.id for r in runs].index(after) + 1 if after else 0
        page = runs[start:start + limit]
        more = start + limit < len(runs)
        state.list_calls.append(f"limit={limit} after={after}")
        return RunList(runs=page, next_after=page[-1].id if more and page else None).model_dump(mode="json")

    @app.get("/runs/{rid}")
    async def get_run(rid: str):
        if rid not in state.runs:
            return err(404, f"no run {rid}")
        return state.runs[rid].model_dump(mode="json")

    @app.get("/runs/{rid}/events")
    async def events(rid: str, after: int = 0):
        def gen():
            for ev in state.events.get(rid, []):
                if ev["seq"] > after:
                    yield f"id: {ev['seq']}\nevent: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/runs/{rid}/instructions")
    async def instructions(rid: str):
        body = "".join(i.model_dump_json() + "\n" for i in state.instructions[rid])
        return Response(body, media_type="application/x-ndjson")

    def measure(instrs: list[Instruction], shared_basis: bool) -> MetricsResponse:
        vecs = [embed(i.text) for i in instrs]
        return MetricsResponse(n=len(vecs), semantic_diversity=semantic_diversity(vecs), mst_diversity=1.5,
                               hull_volume=0.01 if shared_basis else 0.02, vendi_score=3.0,
                               distinct_1=0.5, distinct_2=0.9)

    async def metrics_for(rid: str, request: MetricsRequest | None):
        state.metrics_requests.append((rid, request))
        return measure(state.instructions[rid], bool(request and request.pca_basis)).model_dump()

    @app.get("/runs/{rid}/compare")
    async def compare(rid: str, other: str = Query(alias="with")):
        """Real semantic diversity of the bag-of-words vectors; two vector coordinates as the map."""
        state.compare_requests.append((rid, other))
        if state.compare_down:
            return err(503, "controller (compare): down")

        def side(r: str) -> RunDiversity:
            instrs = state.instructions[r]
            rounds = sorted({i.round for i in instrs})
            return RunDiversity(run_id=r, metrics=measure(instrs, True),
                                per_round={k: measure([i for i in instrs if i.round == k], True) for k in rounds},
                                points=[RoundPoint(x=embed(i.text)[0], y=embed(i.text)[1], round=i.round)
                                        for i in instrs])

        return RunComparison(run=side(rid), other=side(other), pca_basis="shared").model_dump(mode="json")

    @app.get("/runs/{rid}/metrics")
    async def metrics_get(rid: str):
        return await metrics_for(rid, None)

    @app.post("/runs/{rid}/metrics")
    async def metrics_post(rid: str, body: MetricsRequest):
        return await metrics_for(rid, body)

    @app.post("/runs/{rid}/qa")
    async def qa(rid: str, body: QARequest):
        instrs = state.instructions[rid]
        if state.qa_none:
            return QAResult(run_id=rid, total=len(instrs), converted=0, rejected=len(instrs),
                            rejections={"unparseable": len(instrs)}).model_dump()
        recs = []
        for k, ins in enumerate(instrs):
            recs.append(ChatRecord.model_validate({"messages": [
                {"role": "user", "content": f"Q about {ins.text}"}, {"role": "assistant", "content": "42"}]}))
            add_event(rid, "qa", {"instruction_id": ins.id, "status": "converted", "done": k + 1,
                                  "total": len(instrs), "converted": k + 1, "rejected": 0})
        state.qa[rid] = recs
        rejected = sum(state.qa_rejections.values())
        return QAResult(run_id=rid, total=len(instrs) + rejected, converted=len(recs), rejected=rejected,
                        rejections=dict(state.qa_rejections)).model_dump()

    @app.get("/runs/{rid}/export")
    async def export(rid: str, format: str = "hf", license: str = "other"):
        # the orchestrator's own writer (real files, real card) over the fake's rows
        import io
        import tarfile
        import tempfile
        from pathlib import Path

        from negspace_orchestrator import export as ex

        if rid not in state.runs:
            return err(404, f"no run {rid}")
        run = state.runs[rid]
        state.exports.append((rid, format))
        info = ex.ExportInfo(run_id=rid, mode=run.mode, status=run.status, config=run.config,
                             attempts=run.progress.attempts, qa_total=len(state.instructions[rid]),
                             qa_converted=len(state.qa.get(rid, [])), qa_rejections=dict(state.qa_rejections),
                             model="fake-model", embedder="fake-embedder", license=license)
        qa_rows = ex.qa_rows(state.qa.get(rid, []))
        with tempfile.TemporaryDirectory() as tmp:
            writer = ex.ExportWriter(Path(tmp), format)
            writer.add("instructions", ex.instruction_rows(state.instructions[rid]))
            writer.add("qa", qa_rows)
            writer.finish(info)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for f in sorted(Path(tmp).rglob("*")):
                    if f.is_file():
                        tar.add(f, arcname=str(f.relative_to(tmp)))
        return Response(buf.getvalue(), media_type="application/x-tar")

    @app.get("/runs/{rid}/qa")
    async def qa_records(rid: str):
        if rid not in state.qa:
            return err(409, "no Q/A yet")
        return Response("".join(r.model_dump_json() + "\n" for r in state.qa[rid]),
                        media_type="application/x-ndjson")

    @app.post("/runs/{rid}/train", status_code=201)
    async def train(rid: str, body: TrainRequest, seed: int | None = None):
        if rid not in state.qa:
            return err(409, "run /qa first")
        key = rid if seed is None else f"{rid}@{seed}"
        if key in state.jobs:  # one job per (run, seed), like the orchestrator
            return state.jobs[key].model_dump(mode="json")
        state.train_requests.setdefault(rid, body)  # the run's first request
        state.seed_requests[key] = body
        first = not any(k == rid or k.startswith(f"{rid}@") for k in state.jobs)
        job = Job(id=f"job-{rid}" if first else f"job-{rid}-s{seed}", status="queued",
                  progress=JobProgress(step=0, total_steps=body.training.max_steps))
        state.jobs[key] = job
        state.job_polls[key] = 0
        return job.model_dump(mode="json")

    @app.get("/runs/{rid}/train")
    async def train_job(rid: str, seed: int | None = None):
        key = rid if seed is None else f"{rid}@{seed}"
        if key not in state.jobs:
            return err(404, f"no job for {key}")
        job = state.jobs[key]
        state.job_polls[key] += 1
        polls = state.job_polls[key]
        total = job.progress.total_steps or 1
        if polls >= 2 and state.fail_train:
            job = job.model_copy(update={"status": "failed", "error": "worker died: out of memory"})
        elif polls >= 3:
            req = state.seed_requests[key]
            score = (0.2 if rid == "run-1" else 0.1) + state.seed_jitter.get((rid, req.training.seed), 0.0)
            job = job.model_copy(update={
                "status": "succeeded", "progress": JobProgress(step=total, total_steps=total, stage="done"),
                "losses": [LossPoint(step=s, loss=2.0 - 0.1 * s) for s in range(1, total + 1)],
                "eval": JobEval(tuned={"results": {"negspace_arith": {"alias": "negspace_arith",
                                                                      "exact_match,first-number": score,
                                                                      "exact_match_stderr,first-number": 0.05}}},
                                base={"results": {"negspace_arith": {"exact_match,first-number": 0.05,
                                                                     "exact_match_stderr,first-number": 0.02}}}
                                if req.compare_base else None)})
        else:
            job = job.model_copy(update={"status": "running",
                                         "progress": JobProgress(step=min(total, polls * 3), total_steps=total,
                                                                 stage="train")})
        state.jobs[key] = job
        return job.model_dump(mode="json")

    return app


@pytest.fixture
def fake_state() -> FakeState:
    return FakeState()


@pytest.fixture
def orch(fake_state):
    return OrchestratorClient("http://orchestrator", transport=httpx.ASGITransport(fake_orchestrator(fake_state)))


def any_value(d: dict[str, Any], key: str):
    return d[key]
