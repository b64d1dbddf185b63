"""Q/A quality: every degenerate pair is rejected with its reason and counted in QAResult."""

from __future__ import annotations

from negspace_contracts.node import ChatCompletionRequest
from negspace_contracts.orchestrator import ExportRequest, QARequest, RunConfig
from negspace_orchestrator import prompts

from .conftest import seeded_text  # noqa: TID252

BASE = "Write a math problem."


def judge(text: str, finish_reason: str | None = "stop", base: str = BASE):
    return prompts.judge_qa(text, base_instruction=base, finish_reason=finish_reason)


def test_a_good_pair_is_kept():
    assert judge("Question: How many legs do 3 cats have?\nAnswer: 3 cats have 12 legs.") == (
        ("How many legs do 3 cats have?", "3 cats have 12 legs."), None)
    # a short answer may reuse the question's words; a number answers a "how many" question
    assert judge("Question: Is Paris the capital of France?\nAnswer: Yes, Paris.")[1] is None
    assert judge("Question: How many apples are left?\nAnswer: 7")[1] is None


def test_unparseable_and_empty():
    assert judge("Sure! Here is a problem about apples.") == (None, prompts.REJECT_UNPARSEABLE)
    assert judge("Question: What is 2+2?\nAnswer:   ") == (None, prompts.REJECT_EMPTY)
    assert judge("Question: What is 2+2?\nAnswer: [the answer]") == (None, prompts.REJECT_EMPTY)
    assert judge("Question: **\nAnswer: 4") == (None, prompts.REJECT_EMPTY)


def test_echo_equal_or_restating():
    assert judge("Question: What is the area of a square of side 3?\n"
                 "Answer: What is the area of a square of side 3?") == (None, prompts.REJECT_ECHO)
    # normalized: case, punctuation and markup do not hide it
    assert judge("Question: How far is the moon?\nAnswer: **how far is the MOON**")[1] == prompts.REJECT_ECHO
    # restated with a word or two changed: 80% of the answer's words are the question's
    assert judge("Question: How many apples does Tom have after buying 5 more?\n"
                 "Answer: Tom have after buying 5 more apples")[1] == prompts.REJECT_ECHO
    assert prompts.is_echo("What is 2+2?", "The sum of two and two is four.") is False


def test_truncated_at_max_tokens():
    ok = "Question: How many legs do 3 cats have?\nAnswer: 3 cats have 12 legs."
    assert judge(ok, finish_reason="length") == (None, prompts.REJECT_TRUNCATED)
    assert judge(ok, finish_reason=None)[1] is None  # an engine that does not say is not cut


def test_language_other_script_than_the_base():
    assert judge("Question: Сколько яблок у Тома?\nAnswer: У Тома пять яблок.") == (None, prompts.REJECT_LANGUAGE)
    assert judge("Question: 汤姆有几个苹果?\nAnswer: 五个")[1] == prompts.REJECT_LANGUAGE
    # the same pair is kept when the base instruction is in that script
    assert judge("Question: Сколько яблок у Тома?\nAnswer: У Тома пять яблок.",
                 base="Напиши математическую задачу.")[1] is None
    # a stray foreign word in an English pair is fine
    assert judge("Question: What does 'привет' mean in English?\nAnswer: It means hello, a greeting.")[1] is None


def test_bare_number_where_an_explanation_is_asked():
    assert judge("Question: Explain how you find 15% of 80.\nAnswer: 12") == (None, prompts.REJECT_BARE_NUMBER)
    assert judge("Question: Why is the answer to 6 x 7 what it is?\nAnswer: **42.**")[1] == prompts.REJECT_BARE_NUMBER
    assert judge("Question: Describe the growth in percent.\nAnswer: $1,200.50")[1] == prompts.REJECT_BARE_NUMBER
    assert judge("Question: Explain how you find 15% of 80.\nAnswer: 10% of 80 is 8 and 5% is 4, so 12.")[1] is None
    assert judge("Question: What is 15% of 80?\nAnswer: 12")[1] is None


BEHAVIOUR: dict[str, str] = {}


def degenerate_script(req: ChatCompletionRequest) -> str:
    content = req.messages[0].content
    if not content.startswith(prompts.QA_PROMPT):
        return seeded_text(req.seed or 0)
    instruction = content[len(prompts.QA_PROMPT):].split("\n\n")[0]
    kind = BEHAVIOUR.get(instruction.split()[0], "ok")
    if kind == "echo":
        return "Question: How many pears are in the basket?\nAnswer: How many pears are in the basket?"
    if kind == "truncated":
        return "Question: How many pears?\nAnswer: " + "pear " * 40
    if kind == "language":
        return "Question: Сколько груш в корзине?\nAnswer: В корзине пять груш."
    if kind == "bare_number":
        return "Question: Explain how many pears are in the basket.\nAnswer: 5"
    if kind == "unparseable":
        return "I cannot do that."
    return f"Question: What about {instruction}?\nAnswer: An answer about it, with detail."


async def test_qa_counts_each_rejection_reason(make_harness):
    async with make_harness(script=degenerate_script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction=BASE, nodes=3, rounds=1, seed=2))).id
        await h.wait(rid)
        firsts = [prompts.clean_instruction(i.text).split()[0] for i in await h.client.runs.instructions(rid)]
        assert len(set(firsts)) == 6, firsts  # the mock's seeded texts start with distinct words
        kinds = ["ok", "echo", "truncated", "language", "bare_number", "unparseable"]
        BEHAVIOUR.update(dict(zip(firsts, kinds, strict=True)))
        result = await h.client.runs.qa(rid, QARequest(max_tokens=32))
        assert (result.total, result.converted, result.rejected) == (6, 1, 5)
        assert result.rejections == {"echo": 1, "truncated": 1, "language": 1, "bare_number": 1, "unparseable": 1}
        qa_events = [e.data async for e in h.client.runs.events(rid) if e.type == "qa"]
        assert sorted(str(e["reason"]) for e in qa_events) == sorted(
            ["None", "echo", "truncated", "language", "bare_number", "unparseable"])
        # the counts are stored: a second call reports the same without generating
        again = await h.client.runs.qa(rid)
        assert again.rejections == result.rejections
        # the dataset card carries them
        from pathlib import Path

        exported = await h.client.runs.export(rid, ExportRequest(format="jsonl"))
        card = (Path(exported.path) / "README.md").read_text()
        assert ("Q/A: 1 of 6 instructions converted, rejected: bare_number 1, echo 1, language 1, "
                "truncated 1, unparseable 1.") in card


def test_rejections_of_a_db_from_before_reasons(tmp_path):
    import sqlite3

    from negspace_orchestrator.store import Store

    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE qa (run_id TEXT NOT NULL, instruction_id TEXT NOT NULL, status TEXT NOT NULL, "
                "question TEXT, answer TEXT, raw TEXT, tries INTEGER NOT NULL, created_at REAL NOT NULL, "
                "PRIMARY KEY (run_id, instruction_id))")
    old.execute("INSERT INTO qa VALUES ('r1', 'i1', 'rejected', NULL, NULL, 'x', 2, 0)")
    old.commit()
    old.close()
    store = Store(tmp_path / "old.db")
    try:
        store.add_qa("r1", "i2", "rejected", None, None, "y", 2, reason="echo")
        assert store.qa_rejections("r1") == {"echo": 1, "unparseable": 1}
    finally:
        store.close()
