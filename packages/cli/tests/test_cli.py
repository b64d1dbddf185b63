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


def test_export_writes_a_loadable_dataset_with_its_card(patched, fake_state, capsys, tmp_path):
    import datasets
    from negspace_orchestrator import export as ex

    assert cli.main(["run", "--base", "Write a poem.", "--nodes", "2", "--rounds", "1"]) == 0
    out = tmp_path / "hf"
    assert cli.main(["export", "run-1", "--format", "hf", "--out", str(out)]) == 0
    dd = datasets.load_from_disk(str(out))
    assert dd["instructions"].to_list() == ex.instruction_rows(fake_state.instructions["run-1"])
    assert list(dd) == ["instructions"]  # no Q/A yet: the card says so
    card = (out / "README.md").read_text()
    assert [c["config_name"] for c in ex.parse_card(card)["configs"]] == ["instructions"]
    assert "the run has no Q/A pairs yet" in card
    # a folder that already holds files is refused, with the reason
    assert cli.main(["export", "run-1", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["export", "run-9", "--out", str(tmp_path / "x")]) == 1
    assert "no run run-9" in capsys.readouterr().err


def test_export_parquet_and_push_to_hub_up_to_the_upload(patched, fake_state, capsys, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    assert cli.main(["run", "--base", "Write a poem.", "--nodes", "2", "--rounds", "0"]) == 0
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo, **kw: calls.append(("create", repo, kw, self.token)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw, self.token)))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "pq"
    assert cli.main(["export", "run-1", "--format", "parquet", "--out", str(out), "--push-to-hub", "me/x"]) == 1
    assert "needs a Hugging Face token" in capsys.readouterr().err and calls == []
    ds = datasets.load_dataset("parquet", data_files=str(out / "instructions.parquet"), split="train")
    assert ds.num_rows == 2 and ds[0]["text"] == fake_state.instructions["run-1"][0].text
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    out2 = tmp_path / "pq2"
    assert cli.main(["export", "run-1", "--format", "parquet", "--out", str(out2), "--push-to-hub", "me/x",
                     "--private"]) == 0
    assert [(c[0], c[1], c[3]) for c in calls] == [("create", "me/x", "hf_secret"), ("upload", "me/x", "hf_secret")]
    assert calls[0][2]["repo_type"] == "dataset" and calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"] == str(out2) and (out2 / "README.md").is_file()


def test_sigterm_stops_a_study_like_ctrl_c_with_the_resume_hint(monkeypatch, tmp_path, capsys):
    """SIGTERM while a study generates: exit 130 with how to resume (it was a traceback)."""
    import asyncio
    import os
    import signal

    from negspace_cli.study import command as study_command

    async def reachable(url):
        return True  # a stack "is running": nothing is started

    async def generate(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the study")

    monkeypatch.setattr(cli, "_reachable", reachable)
    monkeypatch.setattr(study_command, "_generate", generate)
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["study", "--base", "Write a poem.", "--arms", "plain-t1.0", "--seeds", "1",
                     "--out", str(tmp_path), "--orchestrator-url", "http://127.0.0.1:9"])
    assert code == 130
    assert "interrupted (rerun the same command to resume)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
