"""The batched, KV-cached transformers engine against the naive recompute loop (the oracle),
with the bundled SmolLM2-135M-Instruct in float32. One model for the whole session (``smol``)."""

from __future__ import annotations

import pytest
from negspace_contracts.node import Guidance
from negspace_node.engines.base import GenerationRequest
from negspace_node.engines.reference import reference_generate
from negspace_node.engines.transformers import TransformersEngine, generate_batched
from negspace_node.settings import NodeSettings
from negspace_node.testing import chat_ids

pytestmark = pytest.mark.slow

POSITIVE = "Write a question about the ocean."
NEGATIVES = ["Write a detailed question about fish, coral reefs and the creatures of the deep blue sea.",
             "sharks", "Describe waves."]


@pytest.fixture(scope="module")
def prompts(smol):
    _, tok = smol
    pos = chat_ids(tok, POSITIVE)
    negs = [chat_ids(tok, n) for n in NEGATIVES]
    assert len(negs[0]) > len(pos) > len(negs[1])       # padding on both sides of the batch
    return pos, negs


@pytest.mark.parametrize("num_negatives, space, max_tokens", [
    (0, "logits", 12), (1, "logits", 12), (1, "logprobs", 12), (3, "logits", 8), (3, "logprobs", 8),
])
def test_batched_engine_equals_the_naive_loop_greedy(smol, prompts, num_negatives, space, max_tokens):
    model, tok = smol
    pos, negs = prompts
    request = GenerationRequest(prompt_ids=pos, negative_ids=negs[:num_negatives], max_tokens=max_tokens,
                                temperature=0.0, guidance=Guidance(scale=3.0, space=space))
    fast = generate_batched(model, tok, request)[0]
    slow = reference_generate(model, tok, request)
    assert fast.token_ids == slow.token_ids and fast.text == slow.text
    assert fast.finish_reason == slow.finish_reason and fast.prompt_tokens == len(pos)
    assert fast.token_ids


def test_guidance_changes_the_text_and_scale_one_is_plain(smol, prompts):
    model, tok = smol
    pos, negs = prompts
    plain = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, max_tokens=12, temperature=0))[0]
    s1 = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, negative_ids=negs, max_tokens=12,
                                                        temperature=0, guidance=Guidance(scale=1.0)))[0]
    guided = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, negative_ids=negs, max_tokens=12,
                                                            temperature=0, guidance=Guidance(scale=3.0)))[0]
    assert s1.token_ids == plain.token_ids
    assert guided.token_ids != plain.token_ids


def test_seeds_sampled_guided_and_n_choices(smol, prompts):
    model, tok = smol
    pos, negs = prompts

    def run(seed, **kw):
        request = GenerationRequest(prompt_ids=pos, negative_ids=negs[:1], guidance=Guidance(scale=2.0), max_tokens=10,
                                    temperature=1.0, top_p=0.95, seed=seed, **kw)
        return request, generate_batched(model, tok, request)

    request, (a,) = run(11)
    _, (b,) = run(11)
    _, (c,) = run(12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert reference_generate(model, tok, request).token_ids == a.token_ids   # same seed, same draws
    plain = GenerationRequest(prompt_ids=pos, max_tokens=8, temperature=1.0, seed=3, n=3)
    outs = generate_batched(model, tok, plain)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert [o.token_ids for o in outs] == [reference_generate(model, tok, plain, choice=i).token_ids
                                           for i in range(3)]


def test_stop_strings_and_length(smol, prompts):
    model, tok = smol
    pos, _ = prompts
    short = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, max_tokens=4, temperature=0))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 4
    full = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, max_tokens=40, temperature=0))[0]
    assert full.finish_reason == "stop" and tok.eos_token_id not in full.token_ids   # ended on EOS
    assert full.token_ids[:4] == short.token_ids
    word = full.text.split()[2]
    cut = generate_batched(model, tok, GenerationRequest(prompt_ids=pos, max_tokens=40, temperature=0,
                                                         stop=(word,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(word)]


async def test_engine_runs_in_a_worker_thread_and_reports_state(smol, prompts):
    model, tok = smol
    pos, negs = prompts
    engine = TransformersEngine(NodeSettings(max_model_len=512), model=model, tokenizer=tok)
    assert engine.state == "loading"
    await engine.start()
    assert engine.state == "ready" and engine.max_model_len == 512 and engine.model_name == "SmolLM2-135M-Instruct"
    request = GenerationRequest(prompt_ids=pos, negative_ids=negs[:2], max_tokens=6, temperature=0,
                                guidance=Guidance(scale=2.0))
    out = await engine.generate(request)
    assert out[0].token_ids == generate_batched(model, tok, request)[0].token_ids
    assert engine.queue_depth() == 0
    await engine.stop()


async def test_engine_start_failure_is_reported(tmp_path):
    engine = TransformersEngine(NodeSettings(model=str(tmp_path / "missing")))
    await engine.start()
    assert engine.state == "error" and "does not exist" in engine.error


async def test_a_cancelled_request_stops_decoding_and_frees_the_worker(smol, prompts, monkeypatch):
    import asyncio

    import negspace_node.engines.transformers as module

    model, tok = smol
    pos, _ = prompts
    engine = TransformersEngine(NodeSettings(), model=model, tokenizer=tok)
    await engine.start()
    engine._eos = frozenset()               # never stops on its own: 300 tokens unless cancelled
    steps = []
    real_sample = module.sample_batch
    monkeypatch.setattr(module, "sample_batch", lambda *a: steps.append(1) or real_sample(*a))
    long = asyncio.create_task(engine.generate(GenerationRequest(prompt_ids=pos, max_tokens=300, temperature=0)))
    while len(steps) < 3:
        await asyncio.sleep(0.01)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    short = await engine.generate(GenerationRequest(prompt_ids=pos, max_tokens=2, temperature=0))
    assert len(short[0].token_ids) == 2
    assert len(steps) < 100                  # the long one stopped at its next step, not after 300
    assert engine.queue_depth() == 0 and engine.state == "ready"
    await engine.stop()


METHOD_OPTIONS = [
    pytest.param({"combine": "mean"}, id="combine-mean"),
    pytest.param({"combine": "max"}, id="combine-max"),
    pytest.param({"alpha": 0.1}, id="alpha-0.1"),
    pytest.param({"max_tokens": 3}, id="max-tokens-3"),
    pytest.param({"combine": "mean", "space": "logprobs", "alpha": 0.1,
                  "max_tokens": 5}, id="all-logprobs"),
]


@pytest.mark.parametrize("options", METHOD_OPTIONS)
def test_method_options_equal_the_naive_loop_greedy(smol, prompts, options):
    model, tok = smol
    pos, negs = prompts
    request = GenerationRequest(prompt_ids=pos, negative_ids=negs, max_tokens=10, temperature=0.0,
                                guidance=Guidance(scale=4.0, **options))
    fast = generate_batched(model, tok, request)[0]
    assert fast.token_ids == reference_generate(model, tok, request).token_ids and fast.token_ids


def test_each_method_option_changes_what_is_drawn_as_defined(smol, prompts):
    """The options are not no-ops, and each does exactly what it says (checked independently of the
    shared guidance code, from the model's own next-token distributions)."""
    import torch
    from negspace_node.engines.reference import next_token_logits

    model, tok = smol
    pos, negs = prompts
    base = dict(prompt_ids=pos, negative_ids=negs, max_tokens=10, temperature=0.0, guidance=Guidance(scale=4.0))
    default = generate_batched(model, tok, GenerationRequest(**base))[0].token_ids
    by_combine = {how: generate_batched(model, tok, GenerationRequest(**{**base, "guidance": Guidance(scale=4.0, combine=how)}))[0].token_ids
                  for how in ("mean", "max")}
    assert len({tuple(default), *map(tuple, by_combine.values())}) == 3
    # max_tokens 3: the first 3 tokens are the guided ones, then plain greedy from the positive
    interval = generate_batched(model, tok, GenerationRequest(**{**base, "guidance": Guidance(scale=4.0, max_tokens=3)}))[0].token_ids
    assert interval[:3] == default[:3] and interval != default
    plain_tail = generate_batched(model, tok, GenerationRequest(prompt_ids=pos + default[:3], max_tokens=7,
                                                                temperature=0.0))[0].token_ids
    assert interval[3:] == plain_tail
    # alpha: a strong scale that draws tokens the positive finds implausible; with alpha 0.1 every
    # token drawn has probability >= 0.1 x the positive's top probability at its step
    strong = {**base, "guidance": Guidance(scale=12.0)}
    wild = generate_batched(model, tok, GenerationRequest(**strong))[0].token_ids
    restricted = generate_batched(model, tok, GenerationRequest(**{**strong, "guidance": Guidance(scale=12.0, alpha=0.1)}))[0].token_ids
    assert restricted != wild

    def ratios(tokens):
        out = []
        for i, t in enumerate(tokens):
            probs = torch.softmax(next_token_logits(model, pos + tokens[:i]).float(), -1)
            out.append(float(probs[t] / probs.max()))
        return out

    assert min(ratios(wild)) < 0.1 <= min(ratios(restricted))


def test_negatives_leave_the_batch_after_the_guidance_interval(smol, prompts, monkeypatch):
    model, tok = smol
    pos, negs = prompts
    rows = []
    forward = model.forward

    def counting(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    request = GenerationRequest(prompt_ids=pos, negative_ids=negs, max_tokens=8, temperature=0.0,
                                guidance=Guidance(scale=4.0, max_tokens=3))
    out = generate_batched(model, tok, request, eos_ids=frozenset())[0]
    assert len(out.token_ids) == 8
    # prefill + 2 guided decode steps with all 4 rows, then the positive alone
    assert rows == [4, 4, 4] + [1] * 5
    monkeypatch.undo()
    assert out.token_ids == reference_generate(model, tok, request, eos_ids=frozenset()).token_ids
