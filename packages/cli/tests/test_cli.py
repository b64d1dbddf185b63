"""`negspace run` / `negspace runs` against the fake orchestrator; option parsing and errors."""

from __future__ import annotations

import json

import httpx
import pytest
from negspace_cli import __main__ as cli
from negspace_contracts.orchestrator import OrchestratorClient

from .conftest import fake_orchestrator  # noqa: TID252


@pytest.fixture
def patched(fake_state, monkeypatch):
    app = fake_orchestrator(fake_state)
    seen = {}

    def orch(a):
        seen["url"] = a.orchestrator_url
        return OrchestratorClient(a.orchestrator_url, transport=httpx.ASGITransport(app))

    monkeypatch.setattr(cli, "_orch", orch)
    return seen


def test_run_submits_follows_and_prints_metrics(patched, fake_state, capsys):
    assert cli.main(["run", "--base", "Write a poem.", "--nodes", "2", "--rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"] == "run-1" and out["status"] == "completed" and out["accepted"] == 6
    assert out["metrics"]["n"] == 6
    cfg = fake_state.runs["run-1"].config
    assert (cfg.mode, cfg.nodes, cfg.rounds, cfg.base_instruction) == ("guided", 2, 2, "Write a poem.")
    assert patched["url"] == "http://127.0.0.1:8000"


def test_run_baseline_and_url_from_env(patched, fake_state, capsys, monkeypatch):
    monkeypatch.setenv("NEGSPACE_ORCHESTRATOR_URL", "http://elsewhere:9000")
    assert cli.main(["run", "--base", "b", "--nodes", "3", "--baseline", "--size", "5"]) == 0
    assert patched["url"] == "http://elsewhere:9000"
    run = fake_state.runs["run-1"]
    assert run.mode == "baseline" and run.config.size == 5 and run.progress.accepted == 5
    assert cli.main(["run", "--base", "b", "--orchestrator-url", "http://flag:1", "--baseline",
                     "--match-run", "run-1"]) == 0
    assert patched["url"] == "http://flag:1" and fake_state.runs["run-2"].progress.accepted == 5


def test_run_errors_say_what_to_fix(patched, fake_state, capsys):
    assert cli.main(["run", "--base", "b", "--baseline"]) == 2
    assert "exactly one of --size N or --match-run" in capsys.readouterr().err
    assert cli.main(["run", "--base", "b", "--nodes", "0"]) == 2
    assert "nodes: Input should be greater than or equal to 1" in capsys.readouterr().err
    fake_state.fail_run = True
    assert cli.main(["run", "--base", "b"]) == 1
    assert "ended failed: boom" in capsys.readouterr().err


def test_runs_lists_table_and_json(patched, capsys):
    assert cli.main(["runs"]) == 0
    assert capsys.readouterr().out.strip() == "no runs"
    cli.main(["run", "--base", "Write a math problem.", "--nodes", "2", "--rounds", "1"])
    capsys.readouterr()
    assert cli.main(["runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["id", "mode", "status", "accepted"]
    assert table[1].split()[:4] == ["run-1", "guided", "completed", "4/4"] and "Write a math problem." in table[1]
    assert cli.main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == "run-1"


def test_runs_follows_the_pages_and_stops_at_the_limit(patched, fake_state, capsys, monkeypatch):
    for i in range(3):
        cli.main(["run", "--base", f"Base {i}.", "--nodes", "1", "--rounds", "0"])
    capsys.readouterr()
    monkeypatch.setattr(cli, "RUNS_PAGE_SIZE", 1)  # one run per page: three pages
    fake_state.list_calls.clear()
    assert cli.main(["runs"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["run-1", "run-2", "run-3"]
    assert fake_state.list_calls == ["limit=1 after=None", "limit=1 after=run-1", "limit=1 after=run-2"]
    fake_state.list_calls.clear()
    assert cli.main(["runs", "--limit", "2"]) == 0
    assert [r.split()[0] for r in capsys.readouterr().out.splitlines()[1:]] == ["run-1", "run-2"]
    assert fake_state.list_calls == ["limit=2 after=None"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["runs", "--limit", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_unreachable_orchestrator_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.delenv("NEGSPACE_ORCHESTRATOR_URL", raising=False)
    assert cli.main(["runs", "--orchestrator-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("negspace: error: cannot reach http://127.0.0.1:9") and "Traceback" not in err


def test_experiment_without_a_stack_and_no_start_fails_clearly(capsys):
    assert cli.main(["experiment", "--base", "b", "--orchestrator-url", "http://127.0.0.1:9", "--no-start"]) == 1
    assert "no orchestrator answers at http://127.0.0.1:9" in capsys.readouterr().err
