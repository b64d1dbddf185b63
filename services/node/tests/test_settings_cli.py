"""Flags, NODE_* variables, the engine factory and ``python -m negspace_node`` start-up errors."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import negspace_node.engines as engines
import pytest
from negspace_node.__main__ import main
from negspace_node.app import create_app
from negspace_node.engines.fake import FakeEngine
from negspace_node.engines.transformers import TransformersEngine
from negspace_node.settings import NodeSettings
from negspace_servekit import parse_settings


def test_flags_and_env(monkeypatch):
    s = parse_settings(NodeSettings, ["--engine", "transformers", "--model", "org/model", "--dtype", "float32",
                                      "--port", "9001", "--max-queue", "3"])
    assert (s.engine, s.model, s.dtype, s.port, s.max_queue) == ("transformers", "org/model", "float32", 9001, 3)
    monkeypatch.setenv("NODE_ENGINE", "fake")
    monkeypatch.setenv("NODE_DTYPE", "bfloat16")
    monkeypatch.setenv("NODE_MAX_MODEL_LEN", "1024")
    s = parse_settings(NodeSettings, [])
    assert (s.engine, s.dtype, s.max_model_len, s.port) == ("fake", "bfloat16", 1024, 8001)
    assert parse_settings(NodeSettings, ["--dtype", "float32"]).dtype == "float32"   # flag over env


def test_bad_flag_values_are_refused(capsys):
    assert main(["--dtype", "int4"]) == 2
    assert "--dtype: Input should be 'auto', 'float32'" in capsys.readouterr().err
    assert main(["--engine", "tgi", "--max-model-len", "8"]) == 2
    err = capsys.readouterr().err
    assert "--engine:" in err and "--max-model-len:" in err


def test_factory_and_default_engine(monkeypatch):
    assert isinstance(engines.get_engine("fake", NodeSettings()), FakeEngine)
    built = engines.get_engine("transformers", NodeSettings())
    assert isinstance(built, TransformersEngine) and built.state == "loading" and built.tokenizer is None
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    assert engines.default_engine_name() == "transformers"
    with pytest.raises(ValueError, match="needs the vllm package"):
        engines.get_engine("vllm", NodeSettings())
    with pytest.raises(ValueError, match="unknown engine"):
        engines.get_engine("tgi", NodeSettings())


def test_create_app_loads_nothing_until_the_lifespan():
    app = create_app(NodeSettings(engine="transformers"))
    engine = app.state.engine
    assert isinstance(engine, TransformersEngine) and engine.state == "loading" and engine._model is None
    assert engine.model_name == "SmolLM2-135M-Instruct"


def test_main_refuses_an_engine_it_cannot_build(monkeypatch, capsys):
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    assert main(["--engine", "vllm"]) == 2
    assert "needs the vllm package" in capsys.readouterr().err


def test_console_script_and_module_help():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("negspace-node") == "negspace_node.__main__:main"
    out = subprocess.run([sys.executable, "-m", "negspace_node", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--engine" in out.stdout and "--dtype" in out.stdout
