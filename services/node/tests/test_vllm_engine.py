"""The vLLM engine against the exact batched transformers engine, on the bundled 135M model.

ONE engine for the whole module (start ~30 s), float32, KV cache 0.5 GiB, and deliberately
TIGHT admission (6 sequence slots, a 600-token step budget) so that concurrent groups must wait
for each other: every test that runs requests concurrently also proves that the gang scheduler
never splits a group (a split group fails with GuidanceGroupError, which no test tolerates).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from negspace_node.testing import require_vllm  # noqa: E402

require_vllm()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negspace_contracts.node import Guidance  # noqa: E402
from negspace_node.engines.base import GenerationRequest, GuidanceGroupError  # noqa: E402
from negspace_node.engines.transformers import generate_batched  # noqa: E402
from negspace_node.settings import NodeSettings  # noqa: E402
from negspace_node.testing import chat_ids  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SLOTS, BUDGET = 6, 600
POSITIVE = "Write one short question a student might ask about the ocean."
NEGATIVES = [
    "Write one short question about fish.",
    "Write one short question a curious student might ask about ships, sailors, ports, storms "
    "and the long history of navigation across the Atlantic and the Pacific oceans.",  # longer than the positive
    "Ask about the weather.",
]


@pytest.fixture(scope="module")
def engine():
    from negspace_node.engines.vllm.engine import VLLMEngine

    settings = NodeSettings(dtype="float32", max_model_len=512, max_num_seqs=SLOTS, kv_cache_gib=0.5, seed=0)
    eng = VLLMEngine(settings, max_num_batched_tokens=BUDGET)
    asyncio.run(eng.start())
    assert eng.state == "ready", eng.error
    yield eng
    asyncio.run(eng.stop())


@pytest.fixture(scope="module")
def ids(engine):
    tok = engine.tokenizer
    return chat_ids(tok, POSITIVE), [chat_ids(tok, n) for n in NEGATIVES]


def run(coro):
    return asyncio.run(coro)


async def gather(engine, requests):
    return await asyncio.gather(*(engine.generate(r) for r in requests), return_exceptions=True)


@pytest.mark.parametrize("negatives", [0, 1, 3])
def test_equals_transformers_engine_token_for_token(engine, ids, smol, negatives):
    model, tokenizer = smol
    positive, negs = ids
    assert len(negs[1]) > len(positive)           # a negative longer than the positive
    request = GenerationRequest(prompt_ids=positive, negative_ids=negs[:negatives], max_tokens=24,
                                temperature=0.0, guidance=Guidance(scale=3.0))
    expected = generate_batched(model, tokenizer, request)
    got = run(engine.generate(request))
    assert got[0].token_ids == expected[0].token_ids
    assert got[0].text == expected[0].text and got[0].finish_reason == expected[0].finish_reason


def test_logprobs_space_and_stop_strings_match_the_reference(engine, ids, smol):
    model, tokenizer = smol
    positive, negs = ids
    request = GenerationRequest(prompt_ids=positive, negative_ids=negs[:2], max_tokens=24, temperature=0.0,
                                guidance=Guidance(scale=2.0, space="logprobs"))
    expected = generate_batched(model, tokenizer, request)[0]
    assert run(engine.generate(request))[0].token_ids == expected.token_ids
    # A stop string cut from the reference's own text ends both engines at the same place.
    stop = expected.text.split()[2]
    stopped = GenerationRequest(**{**request.__dict__, "stop": (stop,)})
    want = generate_batched(model, tokenizer, stopped)[0]
    got = run(engine.generate(stopped))[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")


def test_seeded_sampling_matches_reference_and_repeats(engine, ids, smol):
    model, tokenizer = smol
    positive, negs = ids
    request = GenerationRequest(prompt_ids=positive, negative_ids=negs[:2], max_tokens=16, temperature=1.0,
                                top_p=0.95, seed=1234, guidance=Guidance(scale=3.0))
    first, second = run(gather(engine, [request, request]))
    assert first[0].token_ids == second[0].token_ids
    # Same guidance math and the same seeded generator as the transformers engine: same draw.
    assert first[0].token_ids == generate_batched(model, tokenizer, request)[0].token_ids
    other = run(engine.generate(GenerationRequest(**{**request.__dict__, "seed": 99})))
    assert other[0].token_ids != first[0].token_ids
    plain = GenerationRequest(prompt_ids=positive, max_tokens=16, temperature=1.0, seed=7)
    a, b = run(gather(engine, [plain, plain]))
    assert a[0].text == b[0].text


def test_scale_one_is_plain_generation_and_plain_n(engine, ids, smol):
    model, tokenizer = smol
    positive, negs = ids
    plain = GenerationRequest(prompt_ids=positive, max_tokens=20, temperature=0.0)
    scale_one = GenerationRequest(prompt_ids=positive, negative_ids=negs, max_tokens=20, temperature=0.0,
                                  guidance=Guidance(scale=1.0))
    a, b = run(gather(engine, [plain, scale_one]))
    assert a[0].token_ids == b[0].token_ids == generate_batched(model, tokenizer, plain)[0].token_ids
    many = run(engine.generate(GenerationRequest(prompt_ids=positive, max_tokens=12, temperature=1.0, seed=5, n=3)))
    assert len(many) == 3 and len({tuple(o.token_ids) for o in many}) > 1
    again = run(engine.generate(GenerationRequest(prompt_ids=positive, max_tokens=12, temperature=1.0, seed=5, n=3)))
    assert [o.token_ids for o in again] == [o.token_ids for o in many]


@pytest.mark.parametrize("options", [
    {"combine": "mean"}, {"combine": "max"}, {"alpha": 0.1},
    {"max_tokens": 3},
    {"combine": "max", "space": "logprobs", "alpha": 0.1, "max_tokens": 5},
], ids=["mean", "max", "alpha", "max-tokens", "all-logprobs"])
def test_method_options_equal_transformers_token_for_token(engine, ids, smol, options):
    model, tokenizer = smol
    positive, negs = ids
    request = GenerationRequest(prompt_ids=positive, negative_ids=negs, max_tokens=16, temperature=0.0,
                                guidance=Guidance(scale=4.0, **options))
    expected = generate_batched(model, tokenizer, request)[0]
    got = run(engine.generate(request))[0]
    assert got.token_ids == expected.token_ids and got.token_ids


def test_min_p_one_keeps_only_the_top_token_plain_and_guided(engine, ids, smol):
    """min_p reaches vLLM's own sampler (plain) and the processor (guided): at min_p = 1 only the
    most probable token survives, so seeded sampling at temperature 1 must equal greedy."""
    model, tokenizer = smol
    positive, negs = ids
    for negatives in ([], negs[:2]):
        greedy = GenerationRequest(prompt_ids=positive, negative_ids=negatives, max_tokens=16, temperature=0.0,
                                   guidance=Guidance(scale=3.0))
        hot = GenerationRequest(**{**greedy.__dict__, "temperature": 1.0, "seed": 3, "min_p": 1.0})
        want = generate_batched(model, tokenizer, greedy)[0].token_ids
        assert run(engine.generate(hot))[0].token_ids == want
        assert run(engine.generate(GenerationRequest(**{**hot.__dict__, "min_p": 0.0})))[0].token_ids != want


def test_eight_concurrent_guided_requests_equal_their_solo_results(engine, ids):
    positive, negs = ids
    tok = engine.tokenizer
    topics = ["the ocean", "volcanoes", "bees", "chess", "rain", "bridges", "music", "the moon"]
    requests = [GenerationRequest(prompt_ids=chat_ids(tok, f"Write one short question about {t}."),
                                  negative_ids=negs[: 1 + i % 3], max_tokens=16, temperature=0.0,
                                  guidance=Guidance(scale=3.0)) for i, t in enumerate(topics)]
    solo = [run(engine.generate(r))[0].token_ids for r in requests]
    scheduler = engine._llm.engine_core.engine_core.scheduler
    held_before = scheduler.held_back_steps
    together = run(gather(engine, requests + [GenerationRequest(prompt_ids=positive, max_tokens=16,
                                                                temperature=0.0)]))
    failures = [r for r in together if isinstance(r, BaseException)]
    assert not failures, failures
    assert [r[0].token_ids for r in together[:8]] == solo
    # 8 groups of 2-4 rows cannot fit 6 slots: the scheduler had to hold whole groups back.
    assert scheduler.held_back_steps > held_before
    assert engine.queue_depth() == 0


def test_a_group_that_loses_a_member_fails_alone(engine, ids, monkeypatch):
    """Defence in depth: if a member vanishes mid-decode (simulated by aborting it inside vLLM),
    the group is never guided with again and the request fails; a concurrent request does not."""
    positive, negs = ids
    victim = GenerationRequest(prompt_ids=positive, negative_ids=negs[:2], max_tokens=20, temperature=0.0,
                               guidance=Guidance(scale=3.0), request_id="victim")
    bystander = GenerationRequest(prompt_ids=positive, negative_ids=negs[:1], max_tokens=20, temperature=0.0,
                                  guidance=Guidance(scale=3.0))
    original = engine._advance_group

    def sabotage(job, news):
        if job.request.request_id == "victim" and len(job.tokens[job.member_ids[0]]) == 2:
            engine._llm.abort_request([job.member_ids[2]])     # vLLM drops it; the job does not know
        return original(job, news)

    monkeypatch.setattr(engine, "_advance_group", sabotage)
    solo = run(engine.generate(bystander))
    got_victim, got_bystander = run(gather(engine, [victim, bystander]))
    assert isinstance(got_victim, GuidanceGroupError), got_victim
    # The scheduler's gang check sees it first (2 of 3 members scheduled); the processor's own
    # check (test_vllm_units) would refuse the group in the same step.
    assert "2 of 3 members" in str(got_victim) or "incomplete" in str(got_victim)
    assert got_bystander[0].token_ids == solo[0].token_ids
    monkeypatch.undo()
    assert run(engine.generate(victim))[0].token_ids       # the engine carries on
    assert engine.state == "ready"


def test_bad_requests_are_refused_before_they_run(engine, ids):
    from negspace_contracts.errors import BadRequestError

    positive, negs = ids
    with pytest.raises(BadRequestError, match="context length"):
        run(engine.generate(GenerationRequest(prompt_ids=positive, negative_ids=negs[:1], max_tokens=500,
                                              guidance=Guidance(scale=2.0))))
    with pytest.raises(BadRequestError, match="max_num_seqs"):
        run(engine.generate(GenerationRequest(prompt_ids=positive, negative_ids=[negs[0]] * SLOTS,
                                              max_tokens=8, guidance=Guidance(scale=2.0))))


def test_a_cancelled_request_frees_its_rows(engine, ids):
    positive, negs = ids

    async def cancel_midway():
        task = asyncio.create_task(engine.generate(GenerationRequest(
            prompt_ids=positive, negative_ids=negs[:2], max_tokens=200, temperature=0.0, guidance=Guidance(scale=3.0))))
        while engine.steps == start_steps:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate(GenerationRequest(prompt_ids=positive, max_tokens=4, temperature=0.0))

    start_steps = engine.steps
    assert run(cancel_midway())[0].token_ids
    assert engine._jobs == {} and engine.queue_depth() == 0
    assert not engine._llm.has_unfinished_requests()


def test_extreme_values_are_decoded_not_fatal(engine, ids, smol):
    """The known poison (issue 12): temperature 1e-30 and guidance_scale 1e30 with negatives used to
    raise inside the processor and kill the loop. Now: 1e-30 is greedy, the scale saturates."""
    model, tokenizer = smol
    positive, negs = ids
    poison = GenerationRequest(prompt_ids=positive, negative_ids=negs[:2], max_tokens=8, temperature=1e-30,
                               guidance=Guidance(scale=1e30), seed=1)
    greedy = GenerationRequest(**{**poison.__dict__, "temperature": 0.0})
    want = generate_batched(model, tokenizer, greedy)[0].token_ids
    assert run(engine.generate(poison))[0].token_ids == want
    for extra in ({"temperature": 2.0, "guidance": Guidance(scale=1.7976931348623157e308), "top_p": 1e-300},
                  {"temperature": 1e-6, "guidance": Guidance(scale=1e38, combine="max"), "min_p": 1.0},
                  {"temperature": 1e-5, "guidance": Guidance(scale=1e-300, space="logprobs")}):
        assert run(engine.generate(GenerationRequest(**{**poison.__dict__, **extra})))[0].token_ids
    plain = GenerationRequest(prompt_ids=positive, max_tokens=4, temperature=1e-30, seed=1)
    assert run(engine.generate(plain))[0].token_ids
    assert engine.state == "ready"


def test_a_group_whose_draw_raises_fails_alone(engine, ids, monkeypatch):
    from negspace_node.engines.vllm.processor import CFGLogitsProcessor

    positive, negs = ids
    real = CFGLogitsProcessor.draw
    real_all = CFGLogitsProcessor.draw_all

    def draw_all(logits, members):      # the batched pass fails whenever the poisoned group is in it
        if any("poison" in state.group_id and position == 2 for state, _, position in members):
            raise RuntimeError("simulated failure in the batched draw")
        return real_all(logits, members)

    def draw(state, logits, indices, position):   # ... and so does that group alone: only it may fail
        if "poison" in state.group_id and position == 2:
            raise RuntimeError("simulated failure in one group's draw")
        return real(state, logits, indices, position)

    monkeypatch.setattr(CFGLogitsProcessor, "draw_all", staticmethod(draw_all))
    monkeypatch.setattr(CFGLogitsProcessor, "draw", staticmethod(draw))
    poison = GenerationRequest(prompt_ids=positive, negative_ids=negs[:2], max_tokens=12, temperature=0.0,
                               guidance=Guidance(scale=3.0), request_id="poison")
    fine = GenerationRequest(prompt_ids=positive, negative_ids=negs[:1], max_tokens=12, temperature=0.0,
                             guidance=Guidance(scale=3.0))
    solo = run(engine.generate(fine))[0].token_ids
    got_poison, got_fine, got_plain = run(gather(engine, [poison, fine, GenerationRequest(
        prompt_ids=positive, max_tokens=6, temperature=0.0)]))
    assert isinstance(got_poison, GuidanceGroupError) and "simulated failure" in str(got_poison), got_poison
    assert got_fine[0].token_ids == solo and got_plain[0].token_ids
    assert engine.state == "ready" and engine._jobs == {} and not engine._llm.has_unfinished_requests()


def test_requests_that_could_never_be_admitted_are_refused_at_once(engine, ids, monkeypatch):
    from negspace_contracts.errors import BadRequestError

    positive, negs = ids
    block = engine._block_size
    monkeypatch.setattr(engine, "_capacity_blocks", 1)          # a KV cache of ONE block
    long_plain = max(1, block - len(positive) + 1)              # prompt + max_tokens needs 2 blocks
    for request in (GenerationRequest(prompt_ids=positive, max_tokens=long_plain),
                    GenerationRequest(prompt_ids=positive, negative_ids=negs[:1], max_tokens=1,
                                      guidance=Guidance(scale=2.0))):       # two members: at least 2 blocks
        with pytest.raises(BadRequestError, match=f"KV cache holds 1 \\({block} tokens\\)"):
            run(engine.generate(request))
    monkeypatch.undo()
    assert run(engine.generate(GenerationRequest(prompt_ids=positive, max_tokens=long_plain)))[0].token_ids
    assert engine._jobs == {}


def run_without_eos(engine, go):
    """``run(go())`` with the engine never stopping on EOS (restored after): ``(its result, seconds)``."""
    eos, engine._eos = engine._eos, frozenset()
    try:
        started = time.monotonic()
        return run(go()), time.monotonic() - started
    finally:
        engine._eos = eos


async def settled_steps(engine) -> int:
    """The engine's step count 0.5 s after a group was abandoned; 1 s later, for
    ``assert_group_left`` to check that it has not moved since."""
    await asyncio.sleep(0.5)
    steps = engine.steps
    await asyncio.sleep(1.0)
    return steps


def assert_group_left(engine, steps: int) -> None:
    assert engine.steps == steps                        # nothing decodes for the abandoned group
    assert engine._jobs == {} and not engine._llm.has_unfinished_requests()


def test_a_request_past_its_deadline_is_aborted_and_stops_consuming_steps(engine):
    """Through the API: a guided request that cannot finish in --request-timeout-s answers 503
    deadline_exceeded, and its group leaves vLLM (no unfinished requests, no more steps)."""

    from negspace_node.app import create_app
    from negspace_node.testing import asgi_client

    app = create_app(NodeSettings(engine="vllm", max_model_len=512, request_timeout_s=1.0), engine=engine)

    async def go():
        async with asgi_client(app) as client:
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": POSITIVE}], "negative_prompts": NEGATIVES[:2],
                "guidance_scale": 3.0, "max_tokens": 400, "temperature": 0})
            return r, await settled_steps(engine)

    (r, steps), seconds = run_without_eos(engine, go)
    assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert seconds < 10
    assert_group_left(engine, steps)
    assert engine.state == "ready"


def test_any_schema_valid_body_through_the_api_never_breaks_the_vllm_engine(engine):
    """Hypothesis, against the real vLLM engine through the HTTP API: any schema-valid body
    (extreme floats, every guidance option) answers 2xx or a 4xx saying what to fix; never a 5xx,
    and the engine loop never dies."""
    from hypothesis import HealthCheck, given, settings
    from negspace_node.app import create_app
    from negspace_node.testing import asgi_client, request_bodies

    app = create_app(NodeSettings(engine="vllm", max_model_len=512), engine=engine)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=request_bodies())
    def check(request):
        path, body = request

        async def call():
            async with asgi_client(app) as client:
                return await client.post(path, json=body)

        r = run(call())
        assert r.status_code < 500, (body, r.text)
        if r.status_code < 400:
            assert len(r.json()["choices"]) == body.get("n", 1)
        else:
            assert r.json()["error"]["message"]
        assert engine.state == "ready", engine.error

    check()
    assert engine._jobs == {} and not engine._llm.has_unfinished_requests()


def test_negatives_stop_decoding_when_the_guidance_interval_ends(engine, ids, smol, monkeypatch):
    """Past ``guidance.max_tokens`` the negatives are aborted (rows and KV blocks freed): each
    decoded exactly ``guidance.max_tokens`` tokens, one per step it was in the batch, while the
    positive went on alone; the text still equals the transformers engine's."""
    model, tokenizer = smol
    positive, negs = ids
    request = GenerationRequest(prompt_ids=positive, negative_ids=negs[:3], max_tokens=16, temperature=0.0,
                                guidance=Guidance(scale=3.0, max_tokens=3))
    finished = []
    real_finish = engine._finish
    monkeypatch.setattr(engine, "_finish", lambda job, **kw: finished.append(
        {rid: len(job.tokens[rid]) for rid in job.member_ids}) or real_finish(job, **kw))
    eos, engine._eos = engine._eos, frozenset()        # decode all 16 tokens
    try:
        got = run(engine.generate(request))[0]
    finally:
        engine._eos = eos
    lengths = list(finished[-1].values())
    assert lengths == [16, 3, 3, 3], lengths
    reference = generate_batched(model, tokenizer, request, eos_ids=frozenset())[0]
    assert got.token_ids == reference.token_ids
    assert engine._jobs == {} and not engine._llm.has_unfinished_requests()


def test_streaming_through_the_openai_client_equals_the_plain_reply(engine):
    """``stream: true`` against the vLLM engine with the official openai client: the streamed text
    equals the non-streamed one (guided greedy, guided seeded with stop strings, plain n=2), the
    usage chunk comes, and ``[DONE]`` ends the raw stream."""
    import httpx
    import openai
    from negspace_node.app import create_app
    from negspace_node.testing import asgi_client

    app = create_app(NodeSettings(engine="vllm", max_model_len=512), engine=engine)
    messages = [{"role": "user", "content": POSITIVE}]
    cases = [dict(temperature=0, extra_body={"negative_prompts": NEGATIVES[:2], "guidance_scale": 3.0}),
             dict(temperature=0.9, seed=4, stop=["?"], extra_body={"negative_prompts": NEGATIVES[:1],
                                                                    "guidance_scale": 2.0}),
             dict(temperature=0.8, seed=2, n=2)]

    async def go():
        client = openai.AsyncOpenAI(base_url="http://node/v1", api_key="x", max_retries=0,
                                    http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
        async with client:
            for kw in cases:
                whole = await client.chat.completions.create(model=engine.model_name, messages=messages,
                                                             max_tokens=16, **kw)
                texts, reasons, usage = {}, {}, None
                async for chunk in await client.chat.completions.create(
                        model=engine.model_name, messages=messages, max_tokens=16, stream=True,
                        stream_options={"include_usage": True}, **kw):
                    usage = chunk.usage or usage
                    for c in chunk.choices:
                        texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                        reasons[c.index] = c.finish_reason or reasons.get(c.index)
                assert [texts[i] for i in sorted(texts)] == [c.message.content for c in whole.choices], kw
                assert [reasons[i] for i in sorted(reasons)] == [c.finish_reason for c in whole.choices]
                assert usage.completion_tokens == whole.usage.completion_tokens
        async with asgi_client(app) as http:
            raw = await http.post("/v1/completions", json={"prompt": POSITIVE, "max_tokens": 4, "stream": True,
                                                           "negative_prompts": NEGATIVES[:1], "guidance_scale": 2})
        assert raw.text.endswith("data: [DONE]\n\n") and '"object":"text_completion"' in raw.text

    run(go())
    assert engine._jobs == {} and not engine._llm.has_unfinished_requests()


def test_leaving_mid_stream_aborts_the_whole_group(engine):
    """A client that disconnects in the middle of a guided stream: the group's members leave
    vLLM (no unfinished requests, no more steps), the engine serves on."""

    from negspace_node.app import create_app
    from negspace_node.testing import raw_post

    app = create_app(NodeSettings(engine="vllm", max_model_len=512), engine=engine)
    start = engine.steps

    async def go():
        status, _ = await raw_post(app, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": POSITIVE}], "negative_prompts": NEGATIVES[:3],
            "guidance_scale": 3.0, "max_tokens": 400, "temperature": 0, "stream": True},
            disconnect_when=lambda: engine.steps - start >= 5)
        return status, await settled_steps(engine)

    (status, steps), seconds = run_without_eos(engine, go)
    assert status == 200 and seconds < 30
    assert_group_left(engine, steps)
    assert run(engine.generate(GenerationRequest(prompt_ids=[1, 2, 3], max_tokens=2)))[0].token_ids


def test_a_dead_loop_turns_into_engine_errors(engine, ids, monkeypatch):
    """LAST in this module (it kills the shared engine): if a vLLM step raises, the waiting request
    and every later one get EngineError (503) and the engine reports the reason."""
    from negspace_node.engines.base import EngineError

    def broken_step():
        raise RuntimeError("simulated engine crash")

    monkeypatch.setattr(engine._llm, "step", broken_step)
    with pytest.raises(EngineError, match="simulated engine crash"):
        run(engine.generate(GenerationRequest(prompt_ids=ids[0], max_tokens=4)))
    assert engine.state == "error" and "simulated engine crash" in engine.error
    with pytest.raises(EngineError):
        run(engine.generate(GenerationRequest(prompt_ids=ids[0], max_tokens=4)))
