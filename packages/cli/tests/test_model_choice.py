"""``--model NAME`` from the command line to the node: the launcher's node command, the foreground
preparation of an optional model, ``negspace experiment``'s recorded config, and the study spec's
``model`` field with its digest rule. Nothing starts, prepares or downloads a real model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import negspace_models
import pytest
from negspace_cli import __main__ as cli
from negspace_cli import launcher
from negspace_cli.study import command as study_command
from negspace_cli.study.spec import StudySpec, default_spec, load_spec


def _old_study_id(spec: StudySpec) -> str:
    """The digest as it was computed before the ``model``, ``dtype`` and ``reuse`` fields existed."""
    body = spec.model_dump(mode="json")
    del body["model"], body["dtype"], body["reuse"]
    return f"{spec.name}-{hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]}"


# -- study spec ---------------------------------------------------------------------------------
def test_the_default_model_keeps_the_old_study_id():
    spec = default_spec()
    assert spec.model == "smollm2-135m"
    assert spec.study_id() == _old_study_id(spec)
    assert default_spec(model="bundled").study_id() == spec.study_id()      # an alias of the default


def test_a_non_default_model_is_canonical_recorded_and_changes_the_id():
    spec = default_spec(model="Qwen2.5-Coder-1.5B-Instruct")
    assert spec.model == "qwen2.5-coder-1.5b"
    assert spec.model_dump(mode="json")["model"] == "qwen2.5-coder-1.5b"
    assert spec.study_id() != default_spec().study_id()
    assert spec.study_id() == default_spec(model="qwen-coder-1.5b").study_id()
    assert default_spec(model="org/other").study_id() not in (spec.study_id(), default_spec().study_id())


def test_committed_study_folders_keep_their_ids():
    root = Path(__file__).resolve().parents[3] / "docs" / "study" / "results"
    folders = [d for d in root.iterdir() if (d / "study.json").is_file()] if root.is_dir() else []
    for folder in folders:
        spec = StudySpec.model_validate(json.loads((folder / "study.json").read_text())["spec"])
        assert spec.study_id() == folder.name


def test_a_dtype_is_recorded_and_changes_the_id_only_when_set():
    assert default_spec().dtype is None
    f32 = default_spec(dtype="float32")
    assert f32.model_dump(mode="json")["dtype"] == "float32"
    assert f32.study_id() != default_spec().study_id() != default_spec(dtype="auto").study_id()
    with pytest.raises(ValueError, match="dtype"):
        default_spec(dtype="int4")


def test_the_spec_dtype_decides_the_stack_a_study_starts(monkeypatch, tmp_path, capsys):
    """What cmd_study hands the launcher: the spec's dtype over --dtype / NODE_DTYPE (said on stderr)."""
    seen = {}

    class StackThatStopsAtStart:
        def __init__(self, config, services):
            seen["dtype"], seen["node"] = config.node_dtype, config.command("node")
            self.urls = {"orchestrator": "http://127.0.0.1:1"}

        def start(self):
            raise launcher.LaunchError("stop here")

        def stop(self):
            pass

    monkeypatch.setattr(study_command.launcher, "Stack", StackThatStopsAtStart)
    monkeypatch.setenv("NODE_DTYPE", "bfloat16")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"bases": ["Write a poem."], "seeds": [1], "arms": ["plain-t1.0"],
                                "dtype": "float32"}))
    a = cli.build_parser().parse_args(["study", "--spec", str(path), "--out", str(tmp_path)])

    async def unreachable(url):
        return False

    rc = study_command.cmd_study(a, reachable=unreachable, stack_config=cli._stack_config,
                                 raise_stop=lambda *x: None, err=lambda m: None)
    assert rc == 1 and seen["dtype"] == "float32"
    assert seen["node"][seen["node"].index("--dtype") + 1] == "float32"
    assert "dtype bfloat16 is not used" in capsys.readouterr().err


def test_a_spec_file_may_name_the_model(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"bases": ["Write a poem."], "seeds": [1], "arms": ["plain-t1.0"],
                                "model": "qwen2.5-coder-1.5b-instruct"}))
    assert load_spec(path).model == "qwen2.5-coder-1.5b"
    assert load_spec(path, model="smollm2-135m").model == "smollm2-135m"      # --model over the file


# -- launcher -----------------------------------------------------------------------------------
def test_the_node_command_carries_the_model_only_when_chosen(monkeypatch):
    monkeypatch.delenv("NODE_MODEL", raising=False)
    node = launcher.StackConfig(engine="vllm", node_model="qwen2.5-coder-1.5b").command("node")
    assert node[node.index("--model") + 1] == "qwen2.5-coder-1.5b"
    assert "--model" not in launcher.StackConfig(engine="vllm").command("node")   # NODE_MODEL is inherited
    monkeypatch.setenv("NODE_MODEL", "qwen-coder-1.5b")
    assert launcher.StackConfig().effective_node_model == "qwen-coder-1.5b"
    assert launcher.StackConfig(node_model="smollm2-135m").effective_node_model == "smollm2-135m"


def test_the_node_command_carries_the_dtype_only_when_chosen():
    node = launcher.StackConfig(engine="vllm", node_dtype="float32").command("node")
    assert node[node.index("--dtype") + 1] == "float32"
    assert "--dtype" not in launcher.StackConfig(engine="vllm").command("node")   # NODE_DTYPE is inherited
    for svc in ("controller", "orchestrator", "trainer"):
        assert "--dtype" not in launcher.StackConfig(node_dtype="float32").command(svc)


class _FakeKnown:
    name, summary, downloads = "fake-model", "a fake", True
    setup_command = "python -m negspace_models prepare fake-model"

    def __init__(self, prepared=False, error=None):
        self.prepared, self.error, self.calls = prepared, error, 0

    def is_prepared(self):
        return self.prepared

    def folder(self):
        return Path("/nowhere/fake-model")

    def prepare(self, force=False):
        self.calls += 1
        if self.error:
            raise negspace_models.ModelResolutionError(self.error)
        return self.folder()


def _stack_with(monkeypatch, known, services=launcher.SERVICES):
    monkeypatch.setattr(negspace_models, "lookup", lambda name: known if name == "fake-model" else None)
    monkeypatch.setattr(negspace_models, "check_model", lambda name: None)
    lines = []
    stack = launcher.Stack(launcher.StackConfig(node_model="fake-model"), services=services, echo=lines.append)
    return stack, lines


def test_an_optional_model_is_prepared_in_the_foreground_once(monkeypatch):
    known = _FakeKnown()
    stack, lines = _stack_with(monkeypatch, known)
    stack.prepare_node_model()
    assert known.calls == 1 and "preparing the node model fake-model once" in lines[0]
    known.prepared = True
    stack.prepare_node_model()
    assert known.calls == 1


def test_a_failed_preparation_says_which_command_retries_it(monkeypatch):
    stack, _ = _stack_with(monkeypatch, _FakeKnown(error="the joined file does not match"))
    with pytest.raises(launcher.LaunchError, match="does not match.*python -m negspace_models prepare fake-model"):
        stack.prepare_node_model()


def test_an_unknown_model_name_fails_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.delenv("NODE_MODEL", raising=False)
    stack = launcher.Stack(launcher.StackConfig(node_model="qwen-7b", logs_dir=tmp_path), echo=lambda m: None)
    with pytest.raises(launcher.LaunchError, match="node model: unknown model 'qwen-7b'.*qwen2.5-coder-1.5b"):
        stack.spawn()
    assert all(svc.proc is None for svc in stack.services.values())


def test_no_preparation_without_a_node(monkeypatch):
    known = _FakeKnown()
    stack, _ = _stack_with(monkeypatch, known, services=("controller",))
    stack.prepare_node_model()
    assert known.calls == 0


# -- commands -----------------------------------------------------------------------------------
class _RecordingStack:
    made: list = []

    def __init__(self, config, services=launcher.SERVICES, **kw):
        self.config, self.services = config, services
        self.urls = {s: config.url(s) for s in launcher.SERVICES}
        _RecordingStack.made.append(self)

    def start(self):
        pass

    def stop(self):
        pass


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    _RecordingStack.made = []
    monkeypatch.setattr(launcher, "Stack", _RecordingStack)
    monkeypatch.delenv("NODE_MODEL", raising=False)

    async def unreachable(url):
        return False

    monkeypatch.setattr(cli, "_reachable", unreachable)
    return _RecordingStack.made


@pytest.mark.parametrize(("flag", "node_model", "recorded_model"), [
    (["--model", "Qwen2.5-Coder-1.5B-Instruct"], "Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b"),
    ([], None, "smollm2-135m"),
])
def test_experiment_passes_the_model_to_the_stack_and_records_it(recorded, monkeypatch, tmp_path, flag,
                                                                  node_model, recorded_model):
    seen = {}

    async def fake_experiment(cfg, url, out_root, quiet):
        seen["cfg"] = cfg
        return tmp_path

    monkeypatch.setattr(cli, "_experiment", fake_experiment)
    assert cli.main(["experiment", "--base", "Write a math problem.", *flag, "--skip-training", "--quiet"]) == 0
    assert recorded[0].config.node_model == node_model
    assert seen["cfg"].model == recorded_model


def test_study_runs_the_stack_on_its_specs_model(recorded, monkeypatch, tmp_path, capsys):
    seen = {}

    async def fake_generate(spec, url, folder, parallel, quiet):
        seen.update(spec=spec, folder=folder)
        raise study_command.StudyError("stop here")

    monkeypatch.setattr(study_command, "_generate", fake_generate)
    monkeypatch.setenv("NODE_MODEL", "smollm2-135m")
    assert cli.main(["study", "--base", "Write a poem.", "--seeds", "1", "--arms", "plain-t1.0",
                     "--model", "qwen-coder-1.5b", "--out", str(tmp_path), "--quiet"]) == 1
    assert seen["spec"].model == "qwen2.5-coder-1.5b"
    assert seen["folder"].name == seen["spec"].study_id()
    assert recorded[0].config.node_model == "qwen2.5-coder-1.5b" and "trainer" not in recorded[0].services
    assert "NODE_MODEL=smollm2-135m is not used" in capsys.readouterr().err


def test_study_without_model_runs_the_default_even_if_node_model_is_set(recorded, monkeypatch, tmp_path):
    async def fake_generate(spec, url, folder, parallel, quiet):
        raise study_command.StudyError("stop here")

    monkeypatch.setattr(study_command, "_generate", fake_generate)
    monkeypatch.setenv("NODE_MODEL", "qwen2.5-coder-1.5b")
    assert cli.main(["study", "--base", "Write a poem.", "--seeds", "1", "--arms", "plain-t1.0",
                     "--out", str(tmp_path), "--quiet"]) == 1
    assert recorded[0].config.node_model == "smollm2-135m"


def test_up_background_prepares_before_it_detaches(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(launcher, "Stack", lambda config: SimpleNamespace(
        prepare_node_model=lambda: (_ for _ in ()).throw(launcher.LaunchError(f"no {config.node_model}"))))
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("NEGSPACE_HOME", str(tmp_path))
    assert cli.main(["up", "--background", "--model", "qwen2.5-coder-1.5b", "--logs", str(tmp_path)]) == 1
    assert calls == []
