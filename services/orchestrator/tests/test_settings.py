"""Flags and ORCHESTRATOR_* variables."""

from __future__ import annotations

import pytest
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_servekit.settings import parse_settings
from pydantic import ValidationError


def test_flags_repeat_and_env_takes_a_comma_list(monkeypatch, tmp_path):
    s = parse_settings(OrchestratorSettings, ["--node-url", "http://a:1", "--node-url", "http://b:2",
                                              "--controller-url", "http://c:3", "--round-mode", "sequential",
                                              "--db", str(tmp_path / "x.db")])
    assert s.node_url == ["http://a:1", "http://b:2"] and s.round_mode == "sequential"
    assert s.db_path == tmp_path / "x.db"
    monkeypatch.setenv("ORCHESTRATOR_NODE_URL", "http://x:1, http://y:2")
    monkeypatch.setenv("NEGSPACE_HOME", str(tmp_path))
    s = parse_settings(OrchestratorSettings, [])
    assert s.node_url == ["http://x:1", "http://y:2"] and s.db_path == tmp_path / "orchestrator.db"


def test_a_url_without_scheme_is_refused():
    with pytest.raises(ValidationError, match="http://"):
        OrchestratorSettings(node_url=["localhost:8001"])


def test_controller_urls_repeat_take_a_comma_list_and_one_still_works(monkeypatch):
    s = parse_settings(OrchestratorSettings, ["--controller-url", "http://c:3"])
    assert s.controller_url == ["http://c:3"]
    s = parse_settings(OrchestratorSettings, ["--controller-url", "http://c-0:8002/", "--controller-url",
                                              "http://c-1:8002"])
    assert s.controller_url == ["http://c-0:8002", "http://c-1:8002"]  # no trailing slash: one name per replica
    monkeypatch.setenv("ORCHESTRATOR_CONTROLLER_URL", "http://c-0:8002, http://c-1:8002,http://c-2:8002")
    assert parse_settings(OrchestratorSettings, []).controller_url == ["http://c-0:8002", "http://c-1:8002",
                                                                       "http://c-2:8002"]
    assert OrchestratorSettings().controller_url == ["http://c-0:8002", "http://c-1:8002", "http://c-2:8002"]
    monkeypatch.delenv("ORCHESTRATOR_CONTROLLER_URL")
    assert OrchestratorSettings().controller_url == []


@pytest.mark.parametrize("urls, message", [
    (["http://c:1", "http://c:1/"], "http://c:1 more than once"),
    (["http://c:1", "http://d:1", "http://c:1"], "http://c:1 more than once"),
    (["controller:8002"], "must start with http:// or https://"),
    (["http://"], "names no host"),
])
def test_bad_controller_urls_stop_the_start_with_the_reason(urls, message, capsys):
    from negspace_orchestrator.__main__ import main

    with pytest.raises(ValidationError, match=message):
        OrchestratorSettings(controller_url=urls)
    argv = [a for u in urls for a in ("--controller-url", u)]
    assert main(argv) == 2  # before anything is served
    err = capsys.readouterr().err
    assert "negspace-orchestrator: error:" in err and message in err
