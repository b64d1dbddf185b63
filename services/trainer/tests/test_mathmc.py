"""negspace_mathmc: the data is verified by code, lm-eval loads the task, and the bundled base
model scores above zero on it (log-likelihood multiple choice, chance 0.25)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from negspace_trainer import local_tasks
from negspace_trainer.local_tasks import TASKS_DIR

FOLDER = TASKS_DIR / "negspace_mathmc"


def test_committed_data_is_what_the_script_generates_and_every_answer_is_right():
    proc = subprocess.run([sys.executable, str(FOLDER / "make_data.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (FOLDER / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 160
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for r in rows:  # recomputed here too, independently of make_data.check
        assert r["choices"][r["label"]] == f"{ops[r['op']](r['a'], r['b'])} {r['things']}"
        assert len(set(r["choices"])) == 4
    # the correct choice is spread over the four positions
    assert all(sum(r["label"] == i for r in rows) >= 25 for i in range(4))


def test_a_corrupted_item_fails_the_check(tmp_path):
    sys.path.insert(0, str(FOLDER))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    rows = [json.loads(x) for x in (FOLDER / "test.jsonl").read_text().splitlines()][:3]
    bad = dict(rows[1], label=(rows[1]["label"] + 1) % 4)
    with pytest.raises(AssertionError, match="item 1"):
        make_data.check([rows[0], bad, rows[2]])


def test_lm_eval_loads_it_as_multiple_choice(tmp_path):
    from lm_eval.tasks import TaskManager

    assert "negspace_mathmc" in local_tasks.shipped_task_names()
    shipped = next(t for t in local_tasks.shipped_tasks() if t.name == "negspace_mathmc")
    assert shipped.num_docs == 160
    manager = TaskManager(include_path=str(local_tasks.materialize(tmp_path)), include_defaults=False)
    task = manager.load(["negspace_mathmc"])["tasks"]["negspace_mathmc"]
    assert task.OUTPUT_TYPE == "multiple_choice"
    doc = next(iter(task.test_docs()))
    assert task.doc_to_choice(doc) == doc["choices"] and task.doc_to_target(doc) == doc["label"]


@pytest.mark.slow
def test_the_bundled_base_model_scores_above_zero(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from negspace_models import resolve_model

    base = resolve_model(None).path
    manager = TaskManager(include_path=str(local_tasks.materialize(tmp_path)), include_defaults=False)
    out = simple_evaluate(model="hf", model_args={"pretrained": base, "dtype": "float32"},
                          tasks=["negspace_mathmc"], limit=24, batch_size=8, device="cpu",
                          task_manager=manager, log_samples=False)
    res = out["results"]["negspace_mathmc"]
    print(f"negspace_mathmc, bundled base, 24 items: acc {res['acc,none']:.3f} +- {res['acc_stderr,none']:.3f}, "
          f"acc_norm {res['acc_norm,none']:.3f} (chance 0.25)")
    assert res["acc,none"] > 0 and res["acc_norm,none"] > 0
    assert 0 < res["acc_stderr,none"] < 0.2  # lm-eval's stderr comes with it

