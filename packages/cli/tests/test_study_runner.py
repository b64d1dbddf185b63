"""The study grid runner against the fake orchestrator: equal counts, resume without generating
anything twice, a failed run created again, a changed spec refused."""

from __future__ import annotations

import json

import pytest
from negspace_cli.study.runner import StudyError, StudyState, cost_of, load_results, reuse_cells, run_cells
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


async def test_reuse_takes_the_same_runs_from_another_study_and_nothing_else(orch, fake_state, tmp_path):
    """A study that adds arms to another takes that study's finished runs of the same base, seed, arm
    and run config (copied, with where they came from), and generates only the rest."""
    first = small_spec(name="first", arms=["plain-t1.0", "guided"])
    await run_cells(first, orch, tmp_path / first.study_id(), quiet=True)
    assert len(fake_state.runs) == 8
    # the bases in another order, one arm more, one seed more; "guided" matches only where configs do
    second = small_spec(name="second", bases=[{"text": "Write a math problem."}, {"text": "Write a poem.", "split": "tune"}],
                        seeds=[1, 2, 3], arms=["plain-t1.0", "guided", "history"], reuse=[first.study_id()])
    folder = tmp_path / second.study_id()
    taken = reuse_cells(second, folder)
    assert sorted(taken) == sorted(cell_key(b, s, a) for b in (0, 1) for s in (1, 2) for a in ("plain-t1.0", "guided"))
    moved = json.loads((folder / "cells" / f"{cell_key(0, 2, 'guided')}.json").read_text())
    source = json.loads((tmp_path / first.study_id() / "cells" / f"{cell_key(1, 2, 'guided')}.json").read_text())
    assert moved["run_id"] == source["run_id"] and moved["texts"] == source["texts"]
    assert moved["base"] == 0 and moved["base_text"] == "Write a math problem." and moved["split"] == "held_out"
    assert moved["reused_from"] == f"{first.study_id()}/{cell_key(1, 2, 'guided')}"
    state = json.loads((folder / "study.json").read_text())
    assert state["cells"][cell_key(0, 2, "guided")]["reused_from"] == moved["reused_from"]
    await run_cells(second, orch, folder, quiet=True)
    assert len(fake_state.runs) == 8 + len(second.cells()) - 8       # only what was missing
    assert reuse_cells(second, folder) == []                           # nothing left to take


def test_reuse_refuses_other_configs_models_and_missing_folders(tmp_path):
    first = small_spec(name="first", arms=["plain-t1.0"])
    folder = tmp_path / first.study_id()
    StudyState.open(folder, first).save()
    cell = {"key": cell_key(0, 1, "plain-t1.0"), "base": 0, "base_text": "Write a poem.", "seed": 1,
            "arm": "plain-t1.0", "run_id": "r1", "texts": [],
            "config": first.run_config(first.resolved_arms()[0], "Write a poem.", 1).model_dump(mode="json")}
    (folder / "cells").mkdir()
    (folder / "cells" / f"{cell['key']}.json").write_text(json.dumps(cell))
    # another size: the same arm name but not the same run
    bigger = small_spec(name="b", arms=["plain-t1.0"], rounds=2, reuse=[first.study_id()])
    assert reuse_cells(bigger, tmp_path / bigger.study_id()) == []
    # another model: nothing is taken
    other = small_spec(name="o", arms=["plain-t1.0"], model="qwen2.5-coder-1.5b", reuse=[first.study_id()])
    assert reuse_cells(other, tmp_path / other.study_id()) == []
    same = small_spec(name="s", arms=["plain-t1.0"], reuse=[first.study_id()])
    assert reuse_cells(same, tmp_path / same.study_id()) == [cell_key(0, 1, "plain-t1.0")]
    with pytest.raises(StudyError, match="does not exist"):
        reuse_cells(small_spec(name="m", reuse=["nope-123"]), tmp_path / "m")


def test_reuse_is_not_part_of_the_study_id():
    """Naming where runs may come from does not change which runs the study is: the folder stays."""
    assert small_spec(reuse=["x-1"]).study_id() == small_spec().study_id()


async def test_a_run_a_reused_study_started_is_followed_not_made_again(orch, fake_state, tmp_path):
    """A reused study's run that has no cell file yet (it was still going when that study stopped) is
    followed by this study when the orchestrator shows the same config: nothing is generated twice."""
    first = small_spec(name="first", arms=["plain-t1.0", "guided"], seeds=[1])
    await run_cells(first, orch, tmp_path / first.study_id(), quiet=True)
    gone = tmp_path / first.study_id() / "cells" / f"{cell_key(0, 1, 'guided')}.json"
    run_id = json.loads(gone.read_text())["run_id"]
    gone.unlink()                                   # as if that study stopped before the run finished
    second = small_spec(name="second", arms=["plain-t1.0", "guided"], seeds=[1], reuse=[first.study_id()])
    folder = tmp_path / second.study_id()
    assert reuse_cells(second, folder) and len(fake_state.runs) == 4
    await run_cells(second, orch, folder, quiet=True)
    assert len(fake_state.runs) == 4                # followed, not created
    cell = json.loads((folder / "cells" / f"{cell_key(0, 1, 'guided')}.json").read_text())
    assert cell["run_id"] == run_id
    assert json.loads((folder / "study.json").read_text())["cells"][cell_key(0, 1, "guided")]["adopted"] is True


def test_analyze_only_takes_no_runs_and_a_missing_reuse_folder_stops_generation(tmp_path):
    from negspace_cli import __main__ as cli
    from negspace_cli.study import command as study_command

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"bases": ["Write a poem."], "seeds": [1], "arms": ["plain-t1.0"],
                                "reuse": ["nope-0123456789"]}))
    errors = []

    async def unreachable(url):
        return False

    def run(*extra):
        a = cli.build_parser().parse_args(["study", "--spec", str(path), "--out", str(tmp_path / "out"), "--quiet", *extra])
        return study_command.cmd_study(a, reachable=unreachable, stack_config=cli._stack_config,
                                       raise_stop=lambda *x: None, err=errors.append)
    assert run() == 2 and "nope-0123456789" in errors[0] and "does not exist" in errors[0]
    assert run("--analyze-only") == 0 and len(errors) == 1
    assert not list((tmp_path / "out").glob("*/cells"))
