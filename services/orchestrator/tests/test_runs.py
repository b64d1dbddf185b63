"""Guided and baseline runs against mocked node and controller services (in-process HTTP)."""

from __future__ import annotations

import asyncio
import time

import pytest
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError
from negspace_contracts.node import ChatCompletionRequest
from negspace_contracts.orchestrator import MAX_NODES, GuidanceSchedule, NegativesSpec, RunConfig
from negspace_servekit.testing import lifespan


def cfg(**kw) -> RunConfig:
    base = dict(base_instruction="Write a math problem.", nodes=2, rounds=2, max_tokens=32, seed=7)
    base.update(kw)
    return RunConfig(**base)


async def test_guided_run_uses_dense_negatives_and_persists_everything(make_harness):
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(negatives=NegativesSpec(k=2, knn=3)))
        assert created.status == "running"  # a slot was free: it started at once
        run = await h.wait(created.id)
        assert run.status == "completed", run.error
        assert run.progress.accepted == 2 * 3 == run.progress.target
        assert run.progress.round == 2 and run.progress.rounds == 2

        gens = [c for k, c in h.log.calls if k == "generate"]
        bootstrap, guided = gens[:2], gens[2:]
        assert all(g["negatives"] == [] and g["scale"] == 1.0 for g in bootstrap)
        # every guided call's negatives are exactly what the controller's dense() returned
        assert h.controller.dense_responses and all(len(d) == 2 for d in h.controller.dense_responses)
        for g in guided:
            assert g["negatives"] in h.controller.dense_responses
            assert g["scale"] == 1.0  # guidance.start; nothing similar here
        # the positive prompt is the augmentation prompt + base instruction
        req = h.nodes[0].requests[0]
        assert req.messages[0].content.endswith("Write a math problem.")
        assert "ONE augmented instruction" in req.messages[0].content

        insts = await h.client.runs.instructions(created.id)
        assert len(insts) == 6 and len({i.id for i in insts}) == 6
        assert sorted((i.node, i.round) for i in insts) == [(n, r) for n in range(2) for r in range(3)]
        assert sorted(i.text for i in insts) == sorted(h.controller.texts())
        assert all(i.max_similarity is not None for i in insts if i.round > 0)


async def test_augment_negative_format_wraps_each_dense_instruction_like_the_positive(make_harness):
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(negatives=NegativesSpec(k=2, knn=3), negative_format="augment"))
        run = await h.wait(created.id)
        assert run.status == "completed", run.error
        positive = h.nodes[0].requests[0].messages[0].content
        prefix = positive.removesuffix("Write a math problem.")
        guided = [c for k, c in h.log.calls if k == "generate"][2:]
        assert guided
        for g in guided:
            dense_texts = [n.removeprefix(prefix) for n in g["negatives"]]
            assert all(n.startswith(prefix) for n in g["negatives"])
            assert dense_texts in h.controller.dense_responses

        metrics = await h.client.runs.metrics(created.id)
        assert metrics.n == 6


async def test_scale_rises_by_step_while_similar_and_stops_at_max_retries(make_harness):
    dup = "the very same instruction every time"

    def script(req: ChatCompletionRequest) -> str:
        if not req.negative_prompts:
            return dup  # bootstrap: node 0 stores the text that every guided attempt repeats
        return dup

    async with make_harness(script=script) as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=1, guidance=GuidanceSchedule(
            start=1.5, step=0.5, max_retries=3)))).id
        run = await h.wait(rid)
        assert run.status == "completed"
        guided = [c for k, c in h.log.calls if k == "generate"][1:]
        assert [g["scale"] for g in guided] == [1.5, 2.0, 2.5, 3.0]  # start + n*step, 1 + max_retries calls
        insts = await h.client.runs.instructions(rid)
        last = [i for i in insts if i.round == 1][0]
        assert last.attempt == 3 and last.guidance_scale == 3.0 and last.max_similarity == pytest.approx(1.0)
        assert run.progress.attempts == 1 + 4


async def test_scale_stops_rising_once_the_text_is_new(make_harness):
    def script(req: ChatCompletionRequest) -> str:
        if not req.negative_prompts or req.guidance_scale < 2.0:
            return "a repeated augmented instruction"
        return f"something different at scale {req.guidance_scale}"

    async with make_harness(script=script) as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=1))).id
        await h.wait(rid)
        guided = [c["scale"] for k, c in h.log.calls if k == "generate"][1:]
        assert guided == [1.0, 1.5, 2.0]
        insts = await h.client.runs.instructions(rid)
        r1 = [i for i in insts if i.round == 1][0]
        assert r1.attempt == 2 and r1.text == "something different at scale 2.0"


async def test_sequential_mode_reproduces_the_reference_call_order(make_harness):
    from negspace_orchestrator.rounds import derive_seed

    boot0 = derive_seed(7, "guided", 0, 0, 0)      # (mode, node, round, attempt)
    node1_r1_a0 = derive_seed(7, "guided", 1, 1, 0)

    def script(req: ChatCompletionRequest) -> str:
        # node 1's first guided attempt repeats node 0's bootstrap text -> exactly one retry
        if req.seed in (boot0, node1_r1_a0):
            return "bootstrap text of node zero"
        return f"text {req.seed}"

    async with make_harness(script=script, round_mode="sequential") as h:
        rid = (await h.client.runs.create(cfg(nodes=2, rounds=1, negatives=NegativesSpec(k=1, knn=1)))).id
        run = await h.wait(rid)
        assert run.status == "completed"
        assert h.log.kinds() == [
            "create",
            "generate", "upsert",            # bootstrap node 0
            "generate", "upsert",            # bootstrap node 1
            "dense", "generate", "similar", "upsert",                          # round 1 node 0
            "dense", "generate", "similar", "generate", "similar", "upsert",   # round 1 node 1, one retry
        ]


async def test_concurrent_acceptance_never_accepts_two_near_duplicates(make_harness):
    def script(req: ChatCompletionRequest) -> str:
        if req.negative_prompts and req.guidance_scale == 1.0:
            return "every node writes this same sentence first"
        return f"unique text for seed {req.seed} scale {req.guidance_scale}"

    async with make_harness(script=script, node_delay=0.02, similar_delay=0.02) as h:
        rid = (await h.client.runs.create(cfg(nodes=4, rounds=1))).id
        run = await h.wait(rid)
        assert run.status == "completed"
        r1 = [i for i in await h.client.runs.instructions(rid) if i.round == 1]
        assert len(r1) == 4
        dups = [i for i in r1 if i.text == "every node writes this same sentence first"]
        assert len(dups) == 1 and dups[0].attempt == 0
        assert sorted(i.attempt for i in r1) == [0, 1, 1, 1]
        # the four first attempts really ran concurrently (all were generated before any retry)
        firsts = [c for k, c in h.log.calls if k == "generate" and c["negatives"]][:4]
        assert all(c["scale"] == 1.0 for c in firsts)


async def test_baseline_makes_no_guided_calls_and_matches_a_guided_run(make_harness):
    async with make_harness() as h:
        gid = (await h.client.runs.create(cfg(nodes=2, rounds=2))).id
        await h.wait(gid)
        n_before = len(h.log.calls)
        bid = (await h.client.runs.create(RunConfig(base_instruction="Write a math problem.", mode="baseline",
                                                    match_run=gid, nodes=3, seed=7))).id
        run = await h.wait(bid)
        assert run.status == "completed" and run.mode == "baseline"
        calls = h.log.calls[n_before:]
        assert {k for k, _ in calls} == {"create", "generate", "upsert"}
        gens = [c for k, c in calls if k == "generate"]
        assert len(gens) == 6 and all(g["negatives"] == [] and g["scale"] == 1.0 for g in gens)
        assert len({g["seed"] for g in gens}) == 6
        insts = await h.client.runs.instructions(bid)
        assert len(insts) == 6 and all(i.guidance_scale is None for i in insts)
        assert (await h.client.runs.metrics(bid)).n == 6
        from negspace_contracts.controller import MetricsRequest
        assert (await h.client.runs.metrics(bid, MetricsRequest(pca_mean=[0.0] * 4))).n == 6
        sized = (await h.client.runs.create(RunConfig(base_instruction="x", mode="baseline", size=4))).id
        assert (await h.wait(sized)).progress.accepted == 4


async def test_compare_measures_both_runs_in_one_controller_call_per_round(make_harness):
    from negspace_contracts.errors import ServiceUnavailableError

    async with make_harness() as h:
        gid = (await h.client.runs.create(cfg(nodes=2, rounds=2))).id
        await h.wait(gid)
        bid = (await h.client.runs.create(RunConfig(base_instruction="Write a math problem.", mode="baseline",
                                                    match_run=gid, nodes=2, seed=7))).id
        await h.wait(bid)
        got = await h.client.runs.compare(gid, bid)
        g, b = h.orch.store.get_run(gid), h.orch.store.get_run(bid)
        assert [c for k, c in h.log.calls if k == "compare"] == [{"a": g.collection, "b": b.collection,
                                                                 "group_by": "round"}]
        assert (got.run.run_id, got.other.run_id, got.pca_basis) == (gid, bid, "shared")
        assert got.run.metrics.n == 6 and got.other.metrics.n == 6
        assert {r: m.n for r, m in got.run.per_round.items()} == {0: 2, 1: 2, 2: 2}
        assert sorted(p.round for p in got.other.points) == sorted(i.round for i in await h.client.runs.instructions(bid))

        with pytest.raises(NotFoundError) as e:
            await h.client.runs.compare(gid, "nope")
        assert e.value.param == "with"
        with pytest.raises(NotFoundError):
            await h.client.runs.compare("nope", bid)
        h.nodes[0].delay = 30.0  # the next run stays without an accepted instruction
        empty = (await h.client.runs.create(RunConfig(base_instruction="x", mode="baseline", size=2))).id
        with pytest.raises(ConflictError, match="no accepted instructions"):
            await h.client.runs.compare(gid, empty)
        await h.client.runs.cancel(empty)
        h.controller.down = True
        with pytest.raises(ServiceUnavailableError):
            await h.client.runs.compare(gid, bid)


async def test_previous_generation_feeds_the_next_round(make_harness):
    async with make_harness() as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=2, use_previous_generation=True))).id
        await h.wait(rid)
        insts = sorted(await h.client.runs.instructions(rid), key=lambda i: i.round)
        prompts_ = [r.messages[0].content for r in h.nodes[0].requests]
        assert prompts_[1].endswith(insts[0].text) and prompts_[2].endswith(insts[1].text)


async def test_events_stream_attempts_rounds_and_ends_when_done(make_harness):
    async with make_harness() as h:
        rid = (await h.client.runs.create(cfg(nodes=2, rounds=1))).id
        events = [e async for e in h.client.runs.events(rid)]
        types = [e.type for e in events]
        assert types[0] == "status" and events[0].data["status"] == "queued"
        assert types.count("attempt") == 4 and types.count("round") == 2
        assert events[-1].type == "status" and events[-1].data["status"] == "completed"
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        a = next(e for e in events if e.type == "attempt")
        assert {"node", "round", "attempt", "scale", "max_similarity", "accepted", "text",
                "latency_s", "completion_tokens"} <= set(a.data)
        tail = [e async for e in h.client.runs.events(rid, after=events[-2].seq)]
        assert [e.seq for e in tail] == [events[-1].seq]


async def test_cancel(make_harness):
    async with make_harness(node_delay=0.05) as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=50))).id
        await h.wait(rid, statuses=("running",))
        run = await h.client.runs.cancel(rid)
        assert run.status == "cancelled"
        n = len(h.log.calls)
        await asyncio.sleep(0.2)
        assert len(h.log.calls) == n  # nothing runs after a cancel
        assert (await h.client.runs.cancel(rid)).status == "cancelled"
        with pytest.raises(ConflictError):
            await h.client.runs.resume(rid)


@pytest.mark.parametrize("body,where", [
    ({"rounds": -1}, "rounds"),
    ({"nodes": 0}, "nodes"),
    ({"nodes": MAX_NODES + 1}, "nodes"),
    ({"similarity_threshold": 0}, "similarity_threshold"),
    ({"similarity_threshold": 1.5}, "similarity_threshold"),
    ({"base_instruction": "   "}, "base_instruction"),
    ({"mode": "baseline"}, "size or match_run"),
    ({"size": 3}, "baseline"),
    ({"mode": "baseline", "match_run": "nope"}, "match_run"),
    ({"mode": "sideways"}, "mode"),
    ({"unknown_field": 1}, "unknown_field"),
])
async def test_bad_run_config_is_a_clear_4xx(make_harness, body, where):
    async with make_harness() as h:
        payload = {"base_instruction": "Write a poem.", **body}
        resp = await h.client._http.post("/runs", json=payload)
        assert 400 <= resp.status_code < 500, resp.text
        err = resp.json()["error"]
        assert where in err["message"], err


async def test_unknown_run_id_is_404(make_harness):
    async with make_harness() as h:
        for call in (h.client.runs.get, h.client.runs.instructions, h.client.runs.cancel,
                     h.client.runs.resume, h.client.runs.metrics, h.client.runs.qa):
            with pytest.raises(NotFoundError) as ei:
                await call("doesnotexist")
            assert "doesnotexist" in ei.value.message
        with pytest.raises(NotFoundError):
            [e async for e in h.client.runs.events("doesnotexist")]


async def test_list_and_health(make_harness):
    async with make_harness() as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=0))).id
        await h.wait(rid)
        runs = (await h.client.runs.list()).runs
        assert [r.id for r in runs] == [rid] and runs[0].progress.eta_seconds == 0.0
        assert (await h.client.runs.list("completed")).runs[0].id == rid
        assert (await h.client.runs.list("paused")).runs == []
        resp = await h.client._http.get("/runs", params={"status": "bogus"})
        assert resp.status_code == 422 and "status" in resp.json()["error"]["message"]
        health = await h.client.health()
        assert health.status == "ok" and health.info["dependencies"]["controller"] == "ok"
        with pytest.raises(BadRequestError):
            await h.client.runs.create(RunConfig.model_construct(base_instruction="x", mode="baseline",
                                                                 size=None, match_run=rid + "x"))


async def test_guided_run_against_the_real_node_api_with_its_fake_engine(make_harness):
    """The node's own app (its request validation, chat rendering, guidance fields) in the loop."""
    from negspace_node.app import create_app as node_app
    from negspace_node.engines.fake import FakeEngine
    from negspace_node.settings import NodeSettings

    engine = FakeEngine()
    app = node_app(NodeSettings(), engine=engine)
    async with make_harness(node_apps=[app]) as h:
        rid = (await h.client.runs.create(cfg(nodes=2, rounds=2, max_tokens=24))).id
        run = await h.wait(rid)
        assert run.status == "completed", run.error
        insts = await h.client.runs.instructions(rid)
        assert len(insts) == 6 and all(i.text for i in insts)
        with_negatives = [r for r in engine.requests if r.negative_ids]
        assert len(with_negatives) == run.progress.attempts - 2  # every round-1+ attempt sent negatives
        # negatives.k = 3, fewer while the collection is smaller (2 points after the bootstrap)
        assert sorted({len(r.negative_ids) for r in with_negatives}) == [2, 3]


async def test_guided_run_and_baseline_against_the_real_node_and_controller_apps(make_harness):
    """Both real APIs in-process (node: FakeEngine; controller: HashingFakeEmbedder, Qdrant in memory)."""
    from negspace_controller.app import create_app as controller_app
    from negspace_controller.settings import ControllerSettings
    from negspace_controller.testing import HashingFakeEmbedder
    from negspace_node.app import create_app as node_app
    from negspace_node.engines.fake import FakeEngine
    from negspace_node.settings import NodeSettings

    ctl = controller_app(ControllerSettings(qdrant_path=":memory:"), embedder=HashingFakeEmbedder())
    async with lifespan(ctl), make_harness(
            node_apps=[node_app(NodeSettings(), engine=FakeEngine())], controller_app=ctl) as h:
        gid = (await h.client.runs.create(cfg(nodes=3, rounds=2, max_tokens=24))).id
        run = await h.wait(gid)
        assert run.status == "completed", run.error
        bid = (await h.client.runs.create(RunConfig(base_instruction="Write a math problem.", mode="baseline",
                                                    match_run=gid, nodes=3, max_tokens=24))).id
        assert (await h.wait(bid)).status == "completed"
        for rid in (gid, bid):
            assert len(await h.client.runs.instructions(rid)) == 9
            m = await h.client.runs.metrics(rid)
            assert m.n == 9 and m.semantic_diversity is not None


async def test_list_pages_in_creation_order_with_a_stable_cursor(make_harness):
    async with make_harness() as h:
        ids = [(await h.client.runs.create(cfg(nodes=1, rounds=0, seed=i))).id for i in range(5)]
        for rid in ids:
            await h.wait(rid)
        assert [r.id for r in (await h.client.runs.list()).runs] == ids  # default: one page of 100
        page = await h.client.runs.list(limit=2)
        assert [r.id for r in page.runs] == ids[:2] and page.next_after == ids[1]
        late = (await h.client.runs.create(cfg(nodes=1, rounds=0, seed=99))).id  # added while paging
        page = await h.client.runs.list(limit=2, after=page.next_after)
        assert [r.id for r in page.runs] == ids[2:4] and page.next_after == ids[3]
        page = await h.client.runs.list(limit=2, after=page.next_after)
        assert [r.id for r in page.runs] == [ids[4], late] and page.next_after is None  # exactly full: last
        await h.wait(late)
        assert [r.id async for r in h.client.runs.iterate(page_size=2)] == [*ids, late]
        assert [r.id async for r in h.client.runs.iterate("completed", page_size=4)] == [*ids, late]
        assert [r.id async for r in h.client.runs.iterate("paused")] == []
        # the cursor run's own status does not matter to a filtered page
        await h.client.runs.cancel((await h.client.runs.create(cfg(nodes=1, rounds=50))).id)
        cancelled = (await h.client.runs.list("cancelled")).runs[0].id
        assert (await h.client.runs.list("completed", after=cancelled)).runs == []
        assert [r.id for r in (await h.client.runs.list("completed", after=ids[2])).runs] == [*ids[3:], late]
        for params, where in [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
                              ({"after": "no-such-run"}, "after"), ({"after": "x" * 201}, "after")]:
            resp = await h.client._http.get("/runs", params=params)
            assert resp.status_code in (400, 422) and where in resp.text, (params, resp.text)
        with pytest.raises(BadRequestError) as ei:
            await h.client.runs.list(after="no-such-run")
        assert ei.value.param == "after" and "next_after" in ei.value.message


async def test_instructions_stream_in_batches_in_round_node_order(make_harness, monkeypatch):
    from negspace_orchestrator.api import deps as app_mod

    monkeypatch.setattr(app_mod, "NDJSON_BATCH", 4)  # 9 instructions: batches of 4, 4, 1
    async with make_harness() as h:
        rid = (await h.client.runs.create(cfg(nodes=3, rounds=2))).id
        await h.wait(rid)
        resp = await h.client._http.get(f"/runs/{rid}/instructions")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson")
        streamed = await h.client.runs.instructions(rid)
        assert streamed == h.orch.store.instructions(rid)
        assert [(i.round, i.node) for i in streamed] == [(r, n) for r in range(3) for n in range(3)]
        empty = (await h.client.runs.create(cfg(nodes=1, rounds=50))).id
        await h.client.runs.cancel(empty)
        assert len(await h.client.runs.instructions(empty)) <= 1


# ---- the run options a study compares (issue: the method must measurably diversify) ----------

async def test_random_negatives_come_from_the_runs_accepted_instructions_not_dense(make_harness):
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(negatives=NegativesSpec(k=2, source="random")))
        run = await h.wait(created.id)
        assert run.status == "completed", run.error
        assert not h.controller.dense_responses  # density selection is switched off
        accepted = {i.text for i in await h.client.runs.instructions(created.id)}
        guided = [c for k, c in h.log.calls if k == "generate"][2:]
        assert guided and all(len(g["negatives"]) == 2 and set(g["negatives"]) <= accepted for g in guided)


async def test_in_prompt_history_lists_the_dense_instructions_and_sends_no_negatives(make_harness):
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(negatives=NegativesSpec(k=2, use="prompt"),
                                                 guidance=GuidanceSchedule(start=3.0)))
        run = await h.wait(created.id)
        assert run.status == "completed", run.error
        reqs = [r for n in h.nodes for r in n.requests]
        assert len(reqs) == 6 and all(r.negative_prompts == [] for r in reqs)
        guided_reqs = [r for r in reqs if "clearly different" in r.messages[0].content]
        assert len(guided_reqs) == 4  # every slot after the bootstrap round (no retries here)
        assert all(r.negative_prompts == [] and r.guidance_scale == 1.0 for r in guided_reqs)
        dense = {t for d in h.controller.dense_responses for t in d}
        for r in guided_reqs:
            content = r.messages[0].content
            assert "clearly different from all of them" in content
            assert any(f"- {t}" in content for t in dense)
        insts = await h.client.runs.instructions(created.id)
        assert all(i.guidance_scale is None for i in insts)  # no CFG, so no scale


async def test_superset_negatives_are_the_positive_plus_one_already_written_instruction(make_harness):
    """neg = pos + w_X: every negative starts with the slot's own positive prompt, so guidance
    subtracts only the pull toward X (issue 21); superset-list sends one negative listing all k."""
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(negative_format="superset", negatives=NegativesSpec(k=2)))
        assert (await h.wait(created.id)).status == "completed"
        guided = [r for n in h.nodes for r in n.requests if r.negative_prompts]
        assert guided
        for r in guided:
            pos = r.messages[0].content
            assert len(r.negative_prompts) == 2
            for neg in r.negative_prompts:
                assert neg.startswith(pos + "\n\nAn augmented instruction that was already written: ")
                assert len(neg) > len(pos) + 60
        listed = await h.client.runs.create(cfg(negative_format="superset-list", negatives=NegativesSpec(k=2)))
        assert (await h.wait(listed.id)).status == "completed"
        guided = [r for n in h.nodes for r in n.requests if r.negative_prompts and "were already" in
                  r.negative_prompts[0]]
        assert guided and all(len(r.negative_prompts) == 1 for r in guided)
        for r in guided:
            neg = r.negative_prompts[0]
            assert neg.startswith(r.messages[0].content + "\n\nAugmented instructions that were already written:\n")
            assert neg.count("\n- ") == 2


async def test_guidance_options_min_p_and_calibrated_threshold_reach_the_node_and_controller(make_harness):
    async with make_harness() as h:
        created = await h.client.runs.create(cfg(
            min_p=0.05, similarity_quantile=0.5,
            guidance=GuidanceSchedule(start=2.0, space="logprobs", combine="max", alpha=0.1, max_tokens=8)))
        run = await h.wait(created.id)
        assert run.status == "completed", run.error
        guided = [r for n in h.nodes for r in n.requests if r.negative_prompts]
        assert guided
        for r in guided:
            assert (r.guidance_space, r.guidance_combine, r.guidance_alpha, r.guidance_max_tokens, r.min_p) == (
                "logprobs", "max", 0.1, 8, 0.05)
        sims = [c for k, c in h.log.calls if k == "similar"]
        assert sims and all(c["quantile"] == 0.5 for c in sims)


def test_reference_preset_is_the_seed_method_and_explicit_fields_win():
    ref = RunConfig(base_instruction="x", preset="reference")
    assert (ref.guidance.start, ref.guidance.step, ref.guidance.max_retries, ref.similarity_threshold,
            ref.negative_format, ref.guidance.combine, ref.guidance.space, ref.temperature, ref.top_p,
            ref.max_tokens, ref.negatives.k, ref.negatives.knn) == (
        1.0, 0.5, 5, 0.9, "raw", "min", "logits", 1.0, 0.9, 150, 3, 5)
    mine = RunConfig(base_instruction="x", preset="reference", similarity_quantile=0.5,
                     guidance={"start": 2.0})
    assert mine.similarity_quantile == 0.5 and mine.guidance.start == 2.0 and mine.guidance.step == 0.5
    # a stored config read back is the same config (the preset does not re-apply over stored fields)
    assert RunConfig.model_validate(mine.model_dump()) == mine
    for bad in ({}, ["reference"], "nope"):  # a clear validation error, never a crash
        with pytest.raises(ValueError, match="preset"):
            RunConfig(base_instruction="x", preset=bad)


async def test_eta_stays_within_2x_of_the_truth_when_the_controller_dominates(make_harness):
    """Issue 15: with an instant node the old ETA (the node's latency alone) said seconds with most
    of the run left. Here each acceptance waits 200 ms on the controller and the node answers at
    once: the ETA read at about a third and two thirds of the run is within 2x of the time that
    was actually left."""
    async with make_harness(similar_delay=0.2) as h:
        # small enough that the fake controller's own O(n^2) Python (dense) stays below the delay
        rid = (await h.client.runs.create(cfg(nodes=2, rounds=15))).id
        readings: list[tuple[float, float]] = []  # (when, eta)
        marks = iter((11, 21))
        mark = next(marks)
        while True:
            run = await h.client.runs.get(rid)
            if run.status != "running" and run.status != "queued":
                break
            if mark is not None and run.progress.accepted >= mark and run.progress.eta_seconds is not None:
                readings.append((time.monotonic(), run.progress.eta_seconds))
                mark = next(marks, None)
            await asyncio.sleep(0.01)
        end = time.monotonic()
        assert run.status == "completed" and len(readings) == 2
        for when, eta in readings:
            truth = end - when
            assert truth / 2 <= eta <= 2 * truth, (eta, truth, readings)
