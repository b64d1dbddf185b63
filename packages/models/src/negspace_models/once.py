"""A model folder built once: under a file lock (other processes wait and reuse it), written aside
and renamed into place with a marker file, so a crash never leaves a half-prepared folder."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

DONE_MARKER = ".negspace-prepared.json"


def prepare_once(target: Path, build: Callable[[Path], dict], *, force: bool = False) -> Path:
    """``target`` once ``build(tmp)`` has filled ``tmp`` (its return value is written as the marker)."""
    if not force and (target / DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (target / DONE_MARKER).is_file():
            return target
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            marker = build(tmp)
            (tmp / DONE_MARKER).write_text(json.dumps(marker))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
