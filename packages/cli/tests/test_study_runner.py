"""The study grid runner against the fake orchestrator: equal counts, resume without generating
anything twice, a failed run created again, a changed spec refused."""

from __future__ import annotations

import json

import pytest
from negspace_cli.study.runner import StudyError, StudyState, cost_of, load_results, run_cells
from negspace_cli.study.spec import StudySpec, cell_key, default_spec
from negspace_contracts.orchestrator import AttemptData, AttemptEvent, RoundData, RoundEvent


def small_spec(**kw) -> StudySpec:
    body = dict(name="t", bases=[{"text": "Write a poem.", "split": "tune"}, {"text": "Write a math problem."}],
                seeds=[1, 2], arms=["plain-t1.0", "guided", "history"], nodes=2, rounds=1, max_tokens=16)
    body.update(kw)
    return StudySpec.model_validate(body)


async def test_every_cell_runs_once_and_a_rerun_generates_nothing(orch, fake_state, tmp_path):
    spec = small_spec()
    await run_cells(spec, orch, tmp_path, quiet=True)
    assert len(fake_state.runs) == len(spec.cells()) == 12
    results = load_results(tmp_path)
    assert len(results) == 12 and all(len(r["texts"]) == spec.per_run == 4 for r in results)
    by_key = {r["key"]: r for r in results}
    plain = by_key[cell_key(0, 1, "plain-t1.0")]
    assert plain["config"]["mode"] == "baseline" and plain["config"]["size"] == 4
    assert plain["config"]["temperature"] == 1.0 and plain["kind"] == "plain"
    guided = by_key[cell_key(1, 2, "guided")]
    assert guided["config"]["negative_format"] == "augment" and guided["config"]["seed"] == 2
    assert guided["base_text"] == "Write a math problem." and guided["split"] == "held_out"
    assert guided["cost"]["attempts"] >= 4 and guided["cost"]["generated_tokens"] >= 0

    await run_cells(spec, orch, tmp_path, quiet=True)        # resume: everything is there
    assert len(fake_state.runs) == 12
    state = json.loads((tmp_path / "study.json").read_text())
    assert state["study_id"] == spec.study_id() and all(c["status"] == "completed" for c in state["cells"].values())


async def test_an_interrupted_study_creates_only_the_missing_runs(orch, fake_state, tmp_path):
    spec = small_spec()
    await run_cells(spec, orch, tmp_path, quiet=True, max_cells=5)
    assert len(fake_state.runs) == 5
    # a run recorded in study.json but whose result file was not written yet is fetched, not re-run
    results = sorted((tmp_path / "cells").glob("*.json"))
    results[0].unlink()
    await run_cells(spec, orch, tmp_path, quiet=True)
    assert len(fake_state.runs) == 12 and len(load_results(tmp_path)) == 12


async def test_a_failed_run_is_reported_then_created_again(orch, fake_state, tmp_path):
    spec = small_spec(seeds=[1], arms=["guided"], bases=[{"text": "Write a poem."}])
    fake_state.fail_run = True
    with pytest.raises(StudyError, match="rerun the same command"):
        await run_cells(spec, orch, tmp_path, quiet=True)
    fake_state.fail_run = False
    await run_cells(spec, orch, tmp_path, quiet=True)
    state = json.loads((tmp_path / "study.json").read_text())
    cell = state["cells"][cell_key(0, 1, "guided")]
    assert cell["status"] == "completed" and len(cell["failed_runs"]) == 1 and len(fake_state.runs) == 2


def test_a_folder_holding_another_study_is_refused(tmp_path):
    StudyState.open(tmp_path, small_spec()).save()
    with pytest.raises(StudyError, match="another study"):
        StudyState.open(tmp_path, small_spec(seeds=[1, 2, 3]))


def test_spec_validation_and_the_default_study():
    with pytest.raises(ValueError, match="unknown arm"):
        small_spec(arms=["plain-t1.0", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        small_spec(seeds=[1, 1])
    spec = default_spec()
    assert len(spec.bases) >= 8 and len(spec.seeds) >= 3 and spec.per_run >= 24
    assert {b.split for b in spec.bases} == {"tune", "held_out"}
    assert spec.study_id() == default_spec().study_id() != small_spec().study_id()
    assert "plain-t1.0" in spec.arms and "reference" in spec.arms and "history" in spec.arms


def test_cost_counts_decode_rows_of_guided_attempts_only():
    def ev(scale, neg, tok):
        return AttemptEvent(run_id="r", data=AttemptData(node=0, round=1, attempt=0, scale=scale, negatives=neg,
                                                         completion_tokens=tok, latency_s=0.5))
    events = [ev(None, 0, 10), ev(1.0, 3, 10), ev(2.0, 3, 10),
              RoundEvent(run_id="r", data=RoundData(round=1, rounds=1, accepted=1, attempts=3))]
    assert cost_of(events, True) == {"attempts": 3, "generated_tokens": 30, "decode_rows": 10 + 10 + 40,
                                     "node_seconds": 1.5}
    assert cost_of(events, False)["decode_rows"] == 30
