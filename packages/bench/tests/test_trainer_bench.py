"""The trainer's benchmarks (negspace_bench.trainer): what they train on."""

from __future__ import annotations

import json

from negspace_trainer.local_tasks import TASKS_DIR

FOLDER = TASKS_DIR / "negspace_mathmc"


def test_bench_eval_trains_the_same_questions_with_correct_or_corrupted_answers():
    from negspace_bench.trainer import bench_eval

    good, bad = bench_eval.records(40, corrupted=False), bench_eval.records(40, corrupted=True)
    assert [r["messages"][0] for r in good] == [r["messages"][0] for r in bad]  # the same questions
    assert all(g["messages"][1] != b["messages"][1] for g, b in zip(good, bad, strict=True))
    test_questions = {json.loads(x)["question"] for x in (FOLDER / "test.jsonl").read_text().splitlines()}
    assert not any(r["messages"][0]["content"].removeprefix("Question: ") in test_questions for r in good)
