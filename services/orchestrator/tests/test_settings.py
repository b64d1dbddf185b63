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
