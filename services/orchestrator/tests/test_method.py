"""The method's policy (method.py, prompts.py) as pure functions, and each run option end to end
against the mock node and controller (a test here fails when its option is ignored)."""

from __future__ import annotations

import random

import pytest
from negspace_contracts.node import ChatCompletionRequest, Guidance
from negspace_contracts.orchestrator import (
    AcceptanceSpec,
    GuidanceSchedule,
    NegativesSpec,
    RunConfig,
    TwoStageSpec,
    VerbalizedSpec,
)
from negspace_orchestrator import prompts
from negspace_orchestrator.method import Method, Tally, derive_seed
from negspace_orchestrator.store import AttemptRow

BASE = "Write a math problem."
VOCAB = [f"w{i}" for i in range(400)]


def seeded_text(seed: int, n: int = 10) -> str:
    return " ".join(random.Random(seed).sample(VOCAB, n))


def cfg(**kw) -> RunConfig:
    base = dict(base_instruction=BASE, nodes=2, rounds=2, max_tokens=32, seed=7)
    base.update(kw)
    return RunConfig(**base)


def row(attempt: int, text: str = "t", *, sim: float | None = None, on_topic: float | None = None) -> AttemptRow:
    return AttemptRow(run_id="r", node=0, round=1, attempt=attempt, scale=None, negatives=[], seed=attempt,
                      text=text, prompt_tokens=None, completion_tokens=None, latency_s=0.0, node_url=None,
                      max_similarity=sim, is_similar=sim is not None, checked=sim is not None, accepted=False,
                      point_id=None, inserted=False, on_topic=on_topic)


# ---- pure policy -------------------------------------------------------------------------------
def test_the_schedule_gives_one_guidance_value_per_attempt():
    g = GuidanceSchedule(start=2.0, step=0.5, combine="max", alpha=0.1, max_tokens=8, space="logprobs")
    assert g.at(0) == Guidance(scale=2.0, space="logprobs", combine="max", alpha=0.1, max_tokens=8)
    assert g.at(2).scale == 3.0
    m = Method(cfg(guidance=g))
    assert m.guidance(Tally(retries=1), True).scale == 2.5 and m.guidance(Tally(), False) is None
    # the request carries it flat on the wire, and reads it back as one value
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], guidance=g.at(1))
    assert req.guidance == g.at(1) and req.model_dump()["guidance_scale"] == 2.5
    with pytest.raises(ValueError, match="not both"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], guidance=g.at(1), guidance_scale=2)


def test_acceptance_rule_and_budgets():
    novel = Method(cfg())
    assert novel.is_on_topic(None) and novel.is_on_topic(-0.5)          # one-sided: always on topic
    assert novel.force_novel(Tally(retries=5)) and not novel.force_novel(Tally(retries=4))
    assert not novel.exhausted(Tally(retries=99))                        # keep last never falls back
    two = Method(cfg(acceptance=AcceptanceSpec(rule="two-sided", on_topic_min=0.3, on_topic_retries=2, keep="best"),
                     guidance=GuidanceSchedule(max_retries=1)))
    assert two.is_on_topic(0.3) and not two.is_on_topic(0.29) and not two.is_on_topic(None)
    assert not two.force_novel(Tally(retries=1)) and not two.force_off_topic(Tally(off_topic=3))
    assert not two.exhausted(Tally(retries=1, off_topic=2))
    assert two.exhausted(Tally(retries=2)) and two.exhausted(Tally(off_topic=3))
    last = Method(cfg(acceptance=AcceptanceSpec(rule="two-sided", on_topic_retries=2, keep="last")))
    assert last.force_off_topic(Tally(off_topic=3)) and not last.force_off_topic(Tally(off_topic=2))


def test_best_attempt_is_the_least_similar_on_topic_one_else_the_most_on_topic():
    two = Method(cfg(acceptance=AcceptanceSpec(rule="two-sided", on_topic_min=0.3, keep="best")))
    attempts = [row(0, sim=0.5, on_topic=0.6), row(1, sim=0.2, on_topic=0.1), row(2, sim=0.3, on_topic=0.4),
                row(3, "", sim=None), row(4, sim=0.3, on_topic=0.9)]
    assert two.best(attempts).attempt == 2          # least similar among on topic; tie -> earlier
    off = [row(0, on_topic=0.1), row(1, on_topic=0.25), row(2, on_topic=-0.2)]
    assert two.best(off).attempt == 1               # none on topic: the most on-topic one
    novel = Method(cfg(acceptance=AcceptanceSpec(keep="best")))
    assert novel.best([row(0, sim=0.9), row(1, sim=0.7), row(2, sim=0.8)]).attempt == 1
    with pytest.raises(ValueError):
        novel.best([row(0, "")])


def test_per_slot_negatives_are_drawn_from_the_densest_pool():
    dense = [f"d{i}" for i in range(8)]
    shared = Method(cfg(negatives=NegativesSpec(k=3)))
    assert shared.dense_count() == 3 and shared.pick_dense(dense, 0, 1) == dense[:3]
    m = Method(cfg(negatives=NegativesSpec(k=3, assign="sample", pool=8)))
    assert m.dense_count() == 8
    picks = {tuple(m.pick_dense(dense, n, 1)) for n in range(6)}
    assert len(picks) > 1                                               # slots differ
    for p in picks:
        assert len(p) == 3 and list(p) == sorted(p, key=dense.index)     # density order kept
    assert m.pick_dense(dense, 2, 1) == m.pick_dense(dense, 2, 1)        # per-slot seed: reproducible
    assert m.pick_dense(dense[:2], 0, 1) == dense[:2]                    # fewer than k: all of them


def test_negatives_spec_validation():
    with pytest.raises(ValueError, match="pool"):
        NegativesSpec(k=3, assign="sample", pool=3)
    with pytest.raises(ValueError, match="source"):
        NegativesSpec(k=3, assign="sample", source="random")
    with pytest.raises(ValueError):
        AcceptanceSpec(on_topic_min=1.5)
    with pytest.raises(ValueError):
        VerbalizedSpec(candidates=1)
    with pytest.raises(ValueError):
        RunConfig(base_instruction="x", prompting="three-stage")


def test_two_stage_prompts():
    p = prompts.angle_prompt(BASE, [])
    assert BASE in p and "angle" in p and "already used" not in p
    p = prompts.angle_prompt(BASE, ["geometry for kids", "train\nschedules"])
    assert p.endswith("- geometry for kids\n- train schedules\n")
    assert prompts.clean_angle('**Angle:** "Probability puzzles for kids."\nmore') == "Probability puzzles for kids"
    assert prompts.clean_angle("1. geometry") == "geometry" and prompts.clean_angle("  \n ") == ""
    assert prompts.clean_angle(" ".join(["w"] * 30)).count("w") == 12
    m = Method(cfg(prompting="two-stage", negative_format="superset", negatives=NegativesSpec(k=1)))
    pos = m.attempt_prompt(BASE, ["X"], "geometry")
    assert pos == m.positive(BASE) + "\n\nWrite it from this angle: geometry"
    (neg,) = m.attempt_negatives(m.format_negatives(["X"], BASE), "geometry")
    assert neg.startswith(m.positive(BASE)) and neg.endswith("angle: geometry")   # still positive + X
    raw = Method(cfg(prompting="two-stage"))
    assert raw.attempt_negatives(["X"], "geometry") == ["X"]


def test_two_stage_topic_wording():
    """The second wording asks for a topic (not an angle), in English, and tells stage two to write the
    instruction rather than what it asks for; the first wording's text is untouched (committed runs)."""
    p = prompts.angle_prompt(BASE, ["Ratios", "train\nschedules"], "topic")
    assert BASE in p and "topic" in p and "angle" not in p.lower() and "English" in p
    assert "Topics already used" in p and p.endswith("- Ratios\n- train schedules\n")
    assert prompts.clean_angle("**Topic:** Ratios in recipes.", wording="topic") == "Ratios in recipes"
    assert prompts.clean_angle("Topic: x", wording="angle") == "Topic: x"          # the first wording keeps its rule
    m = Method(cfg(prompting="two-stage", negative_format="superset", negatives=NegativesSpec(k=1),
                   two_stage=TwoStageSpec(prompt="topic")))
    pos = m.attempt_prompt(BASE, ["X"], "ratios")
    assert pos.startswith(m.positive(BASE) + "\n\nThe augmented instruction must be about this topic: ratios\n")
    assert "do not write what it asks for" in pos and "from this angle" not in pos
    (neg,) = m.attempt_negatives(m.format_negatives(["X"], BASE), "ratios")
    assert neg.startswith(m.positive(BASE)) and neg.endswith(pos[len(m.positive(BASE)):])  # positive + X + topic
    assert m.angle_prompt(BASE, []) == prompts.angle_prompt(BASE, [], "topic")
    assert Method(cfg(prompting="two-stage")).angle_prompt(BASE, []) == prompts.ANGLE_PROMPT.format(base=BASE)
    with pytest.raises(ValueError):
        TwoStageSpec(prompt="focus")


def test_verbalized_prompt_parse_and_draw():
    p = prompts.verbalized_prompt("POS", 4)
    assert p.startswith("POS") and "4 different" in p and "Probability:" in p
    reply = ("Sure!\n1. Instruction: Write a word problem about trains.\nProbability: 0.5\n"
             "**Instruction 2:** \"Create a geometry question.\"\n**Probability:** 30%\n"
             "Instruction: Ask for a proof. (probability: 0.2)\nInstruction: broken\nProbability: zero\n")
    cands = prompts.parse_verbalized(reply)
    assert cands == [("Write a word problem about trains.", 0.5), ("Create a geometry question.", 0.3),
                     ("Ask for a proof.", 0.2)]
    assert prompts.parse_verbalized("Write a problem about trains.") == []
    assert prompts.parse_verbalized("Instruction: x\nProbability: 0") == []
    # drawn by the stated probabilities, reproducibly by seed
    counts = {c: 0 for c, _ in cands}
    for seed in range(2000):
        counts[prompts.draw_verbalized(cands, seed)] += 1
    assert counts["Write a word problem about trains."] > counts["Create a geometry question."] > \
        counts["Ask for a proof."] > 200
    assert prompts.draw_verbalized(cands, 5) == prompts.draw_verbalized(cands, 5)
    assert prompts.draw_verbalized([], 1) == ""
    m = Method(cfg(prompting="verbalized", verbalized=VerbalizedSpec(candidates=3)))
    assert m.max_tokens() == 96 and m.reply_text("no format here", 1) == ""
    assert m.reply_text(reply, 1) in {c for c, _ in cands}


def test_reference_preset_keeps_the_reference_acceptance_and_prompting():
    ref = RunConfig(base_instruction="x", preset="reference")
    assert (ref.acceptance.rule, ref.acceptance.keep, ref.prompting, ref.negatives.assign) == (
        "novel", "last", "direct", "shared")


# ---- run level ---------------------------------------------------------------------------------
def on_off_script(req: ChatCompletionRequest) -> str:
    """Half the texts repeat the base's words (on topic for the bag-of-words embedder), half do not."""
    seed = req.seed or 0
    if random.Random(seed).random() < 0.5:
        return f"{BASE} {seeded_text(seed, 6)}"
    return seeded_text(seed)


async def _attempt_events(h, rid):
    return [e.data async for e in h.client.runs.events(rid) if e.type == "attempt"]


async def test_two_sided_rule_accepts_only_on_topic_texts_and_persists_the_cosine(make_harness):
    async with make_harness(script=on_off_script) as h:
        rule = AcceptanceSpec(rule="two-sided", on_topic_min=0.3, on_topic_retries=20)
        rid = (await h.client.runs.create(cfg(nodes=3, rounds=3, acceptance=rule))).id
        assert (await h.wait(rid)).status == "completed"
        guided = [i for i in await h.client.runs.instructions(rid) if i.round > 0]
        assert len(guided) == 9 and all(i.text.startswith(BASE) for i in guided)
        events = await _attempt_events(h, rid)
        off = [e for e in events if e.round > 0 and not e.accepted]
        assert off and all(e.on_topic is not None and e.on_topic < 0.3 for e in off)
        assert all(e.on_topic >= 0.3 for e in events if e.round > 0 and e.accepted)
        stored = [a for a in h.orch.store.attempts(rid) if a.round > 0]
        assert all(a.on_topic is not None for a in stored)
        embeds = [c for k, c in h.log.calls if k == "embed"]
        assert sum(c == [BASE] for c in embeds) == 1       # the base embedded once per run
        # the one-sided reference rule ignores the topic: off-topic texts get in
        rid2 = (await h.client.runs.create(cfg(nodes=3, rounds=3))).id
        assert (await h.wait(rid2)).status == "completed"
        assert any(not i.text.startswith(BASE) for i in await h.client.runs.instructions(rid2) if i.round > 0)


def similar_script(req: ChatCompletionRequest) -> str:
    """Every text shares a seed-dependent number of words with every other: all are 'similar' at a
    low threshold, each to a different degree."""
    seed = req.seed or 0
    rng = random.Random(seed)
    return " ".join([f"common{i}" for i in range(rng.randint(2, 9))] + [seeded_text(seed, 4)])


async def test_keep_best_forces_in_the_least_similar_attempt_and_keep_last_the_last(make_harness):
    async with make_harness(script=similar_script) as h:
        common = dict(nodes=1, rounds=3, similarity_threshold=0.05, guidance=GuidanceSchedule(max_retries=3))
        best_id = (await h.client.runs.create(cfg(acceptance=AcceptanceSpec(keep="best"), **common))).id
        last_id = (await h.client.runs.create(cfg(**common))).id
        assert (await h.wait(best_id)).status == (await h.wait(last_id)).status == "completed"
        best_events = await _attempt_events(h, best_id)
        picked_not_last = 0
        for r in (1, 2, 3):
            first = [e for e in best_events if e.round == r and not e.kept]
            kept = [e for e in best_events if e.round == r and e.kept]
            assert len(first) == 4 and not any(e.accepted for e in first)   # every attempt judged once
            assert len(kept) == 1 and kept[0].accepted
            want = min(first, key=lambda e: (e.max_similarity, e.attempt))
            assert kept[0].attempt == want.attempt
            picked_not_last += want.attempt != 3
        assert picked_not_last                       # the rule changed something here
        insts = await h.client.runs.instructions(last_id)
        assert all(i.attempt == 3 for i in insts if i.round > 0)
        last_events = await _attempt_events(h, last_id)
        assert not any(e.kept for e in last_events)


async def test_keep_best_slot_replays_to_the_same_choice(make_harness):
    """A slot whose fallback was cut before its verdict was stored decides the same on replay,
    from the stored verdicts, without generating again."""
    async with make_harness(script=similar_script) as h:
        c = cfg(nodes=1, rounds=1, similarity_threshold=0.05, acceptance=AcceptanceSpec(keep="best"),
                guidance=GuidanceSchedule(max_retries=2))
        rid = (await h.client.runs.create(c)).id
        assert (await h.wait(rid)).status == "completed"
        store = h.orch.store
        kept = [a for a in store.slot_attempts(rid, 0, 1) if a.accepted][0]
        store.db.execute("UPDATE attempts SET accepted = 0, point_id = NULL, inserted = 0 WHERE run_id = ? AND round = 1",
                         (rid,))
        generated = len([k for k, _ in h.log.calls if k == "generate"])
        await h.orch.rounds._slot(store.get_run(rid), 0, 1)
        assert len([k for k, _ in h.log.calls if k == "generate"]) == generated
        again = [a for a in store.slot_attempts(rid, 0, 1) if a.accepted]
        assert [a.attempt for a in again] == [kept.attempt]


async def test_sampled_negatives_differ_between_the_slots_of_a_round(make_harness):
    async with make_harness() as h:
        shared = (await h.client.runs.create(cfg(nodes=4, rounds=2, negatives=NegativesSpec(k=2)))).id
        assert (await h.wait(shared)).status == "completed"
        sets = [tuple(c["negatives"]) for k, c in h.log.calls if k == "generate" and c["negatives"]]
        assert len(set(sets[:4])) == 1                  # round 1: every slot the same 2 texts
        h.log.calls.clear()
        h.controller.dense_responses.clear()
        sampled = (await h.client.runs.create(cfg(nodes=4, rounds=2,
                                                  negatives=NegativesSpec(k=2, assign="sample", pool=6)))).id
        assert (await h.wait(sampled)).status == "completed"
        assert all(len(d) <= 6 for d in h.controller.dense_responses) and \
            any(len(d) > 2 for d in h.controller.dense_responses)
        gens = [c for k, c in h.log.calls if k == "generate" and c["negatives"]]
        assert len({tuple(g["negatives"]) for g in gens}) > 2
        for g in gens:
            assert len(g["negatives"]) == 2 and any(set(g["negatives"]) <= set(d) for d in h.controller.dense_responses)


def two_stage_script(req: ChatCompletionRequest) -> str:
    prompt = req.messages[0].content
    if prompt.startswith("Base instruction:"):
        return f"Angle: topic{(req.seed or 0) % 1000}."
    return seeded_text(req.seed or 0)


async def test_two_stage_samples_an_angle_then_the_instruction_conditioned_on_it(make_harness):
    async with make_harness(script=two_stage_script) as h:
        rid = (await h.client.runs.create(cfg(
            prompting="two-stage", temperature=0.7, negatives=NegativesSpec(k=0),
            two_stage=TwoStageSpec(angle_temperature=1.3, angle_max_tokens=12, avoid_used=4)))).id
        assert (await h.wait(rid)).status == "completed"
        reqs = [r for n in h.nodes for r in n.requests]
        angles = [r for r in reqs if r.messages[0].content.startswith("Base instruction:")]
        instrs = [r for r in reqs if not r.messages[0].content.startswith("Base instruction:")]
        assert len(angles) == len(instrs) == 6
        assert all(r.temperature == 1.3 and r.max_tokens == 12 for r in angles)
        assert all(r.temperature == 0.7 and "Write it from this angle: topic" in r.messages[0].content for r in instrs)
        assert any("Angles already used" in r.messages[0].content for r in angles)   # later rounds list them
        events = await _attempt_events(h, rid)
        assert all(e.angle and e.angle.startswith("topic") for e in events)
        assert all(a.angle for a in h.orch.store.attempts(rid))
        insts = await h.client.runs.instructions(rid)  # a data user sees what each was written from
        assert len(insts) == 6 and all(i.angle and i.angle.startswith("topic") for i in insts)


async def test_two_stage_topic_wording_reaches_the_node(make_harness):
    async with make_harness(script=two_stage_script) as h:
        rid = (await h.client.runs.create(cfg(prompting="two-stage", negatives=NegativesSpec(k=0),
                                              two_stage=TwoStageSpec(prompt="topic", avoid_used=4)))).id
        assert (await h.wait(rid)).status == "completed"
        reqs = [r for n in h.nodes for r in n.requests]
        stage1 = [r for r in reqs if r.messages[0].content.startswith("Base instruction:")]
        stage2 = [r for r in reqs if not r.messages[0].content.startswith("Base instruction:")]
        assert len(stage1) == len(stage2) == 6
        assert all("Suggest ONE specific topic" in r.messages[0].content for r in stage1)
        assert any("Topics already used" in r.messages[0].content for r in stage1)
        assert all("must be about this topic: Angle: topic" in r.messages[0].content for r in stage2)


def verbalized_script(req: ChatCompletionRequest) -> str:
    seed = req.seed or 0
    if seed % 4 == 0:
        return "I cannot follow the format."
    return "".join(f"Instruction: {seeded_text(seed * 10 + i)}\nProbability: {0.1 * (i + 1):.1f}\n" for i in range(3))


async def test_verbalized_sampling_keeps_one_candidate_and_retries_unparseable_replies(make_harness):
    async with make_harness(script=verbalized_script) as h:
        rid = (await h.client.runs.create(cfg(nodes=3, rounds=2, prompting="verbalized",
                                              verbalized=VerbalizedSpec(candidates=3),
                                              negatives=NegativesSpec(k=0)))).id
        assert (await h.wait(rid)).status == "completed"
        reqs = [r for n in h.nodes for r in n.requests]
        assert all("3 different" in r.messages[0].content and r.max_tokens == 96 for r in reqs)
        texts = {i.text for i in await h.client.runs.instructions(rid)}
        candidates = {seeded_text(r.seed * 10 + i) for r in reqs for i in range(3)}
        assert len(texts) == 9 and texts <= candidates
        events = await _attempt_events(h, rid)
        assert any(e.empty for e in events) == any((r.seed or 0) % 4 == 0 for r in reqs)


async def test_bad_method_options_are_4xx(make_harness):
    async with make_harness() as h:
        for bad in ({"negatives": {"k": 3, "assign": "sample", "pool": 2}},
                    {"acceptance": {"rule": "three-sided"}}, {"acceptance": {"on_topic_min": 2}},
                    {"prompting": "verbal"}, {"verbalized": {"candidates": 50}},
                    {"two_stage": {"angle_max_tokens": 0}}):
            resp = await h.client._http.post("/runs", json={"base_instruction": BASE, **bad})
            assert resp.status_code in (400, 422), (bad, resp.text)


def test_derive_seed_is_shared_with_rounds():
    from negspace_orchestrator import rounds

    assert rounds.derive_seed is derive_seed


def test_a_database_from_before_the_new_columns_is_migrated(tmp_path):
    import sqlite3

    from negspace_orchestrator.store import Store

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
        node INTEGER NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, scale REAL,
        negatives TEXT NOT NULL DEFAULT '[]', seed INTEGER NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER,
        completion_tokens INTEGER, latency_s REAL NOT NULL, node_url TEXT, max_similarity REAL, is_similar INTEGER,
        checked INTEGER NOT NULL DEFAULT 0, accepted INTEGER NOT NULL DEFAULT 0, point_id TEXT,
        inserted INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, UNIQUE (run_id, node, round, attempt));
        INSERT INTO attempts (run_id, node, round, attempt, seed, text, latency_s, created_at)
        VALUES ('r', 0, 1, 0, 1, 'old text', 0.1, 0);""")
    db.commit()
    db.close()
    store = Store(path)
    (old,) = store.slot_attempts("r", 0, 1)
    assert old.text == "old text" and old.on_topic is None and old.angle is None
    store.record_on_topic("r", 0, 1, 0, 0.42)
    store.add_attempt(row(1, "new"))
    assert [a.on_topic for a in store.slot_attempts("r", 0, 1)] == [0.42, None]
    store.close()
