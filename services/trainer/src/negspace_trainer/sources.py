"""Where a job's ``dataset.path`` may point, checked at ``POST /jobs``.

Any client that passes auth can submit a job, so ``dataset.path`` must not let it read any file
the trainer's user can read, nor make the trainer fetch any URL (internal services, cloud
metadata endpoints). A file must lie inside one of ``--dataset-dirs`` once symlinks and ``..``
are resolved (checked on the path, and again on the file actually opened, so swapping a symlink
between the check and the read does not escape); a URL must start with one of
``--dataset-url-prefixes`` (none by default). Files are read and copied into the job when it is
submitted; URLs are fetched by the worker, which does not follow redirects.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx
from negspace_contracts.errors import BadRequestError
from negspace_contracts.trainer import ChatRecord
from pydantic import ValidationError

from negspace_trainer.settings import TrainerSettings

MAX_DATASET_FILE_BYTES = 1024 * 1024 * 1024
PARAM = "dataset.path"
_ENCODED_DOT = re.compile(rb"%2e", re.IGNORECASE)


def _refuse(message: str) -> BadRequestError:
    return BadRequestError(message, param=PARAM, status_code=422)


@dataclass(frozen=True)
class DatasetSource:
    """A checked ``dataset.path``: either ``url`` (normalized, to fetch) or ``file`` (resolved)."""

    url: str | None = None
    file: Path | None = None


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def check_url(source: str, settings: TrainerSettings) -> str:
    """The URL as it will be fetched (dot segments removed, host lower-cased) if it starts with an
    allowed prefix; 422 otherwise."""
    prefixes = settings.dataset_url_prefixes
    if not prefixes:
        raise _refuse(f"dataset.path {source!r}: this trainer fetches no URLs (its "
                      "--dataset-url-prefixes / TRAINER_DATASET_URL_PREFIXES is empty); send the "
                      "records inline, or have the operator allow the "
                      "URL's prefix")
    try:
        url = httpx.URL(source)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise _refuse(f"dataset.path {source!r} is not a valid URL: {exc}") from None
    if url.userinfo or "\\" in source or _ENCODED_DOT.search(url.raw_path) or not url.host:
        raise _refuse(f"dataset.path {source!r}: URLs with user info, backslashes or encoded dots "
                      "are refused; give the plain URL")
    normalized = str(url)
    allowed = [str(httpx.URL(p)) for p in prefixes]
    if not any(normalized.startswith(p) for p in allowed):
        raise _refuse(f"dataset.path {source!r} is outside the URL prefixes this trainer may fetch "
                      f"({', '.join(allowed)}); use one of them, or have the operator add the "
                      "prefix to --dataset-url-prefixes / TRAINER_DATASET_URL_PREFIXES")
    return normalized


def _inside(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in dirs)


def check_file(source: str, settings: TrainerSettings) -> Path:
    """The resolved file if it lies inside an allowed folder; 422 otherwise. A relative path is
    taken inside the first allowed folder. Nothing about files outside is revealed (whether
    they exist or not, the answer is the same)."""
    dirs = settings.allowed_dataset_dirs
    try:
        raw = Path(source).expanduser()
        path = (raw if raw.is_absolute() else dirs[0] / raw).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a symlink loop
        raise _refuse(f"dataset.path {source!r} is not a usable file path") from None
    if not _inside(path, dirs):
        raise _refuse(f"dataset.path {source!r} is outside the folders this trainer may read "
                      f"({', '.join(map(str, dirs))}; symlinks and '..' are resolved first); put "
                      "the file there, send the records inline, or have the operator add its "
                      "folder to --dataset-dirs / TRAINER_DATASET_DIRS")
    return path


def check(source: str, settings: TrainerSettings) -> DatasetSource:
    if is_url(source):
        return DatasetSource(url=check_url(source, settings))
    if "://" in source:
        raise _refuse(f"dataset.path {source!r}: only http:// and https:// URLs are supported")
    return DatasetSource(file=check_file(source, settings))


def _open_inside(path: Path, source: str, dirs: list[Path]):
    """Open ``path`` and check that the file really opened is inside ``dirs`` (a symlink swapped
    in after ``check_file`` resolved the path cannot lead elsewhere)."""
    try:
        # O_NONBLOCK: a FIFO must not hang the request (it is refused below, not being a regular file)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise _refuse(f"dataset.path {source!r} is not a readable file on the trainer's machine "
                      "(give a JSONL file of chat records inside --dataset-dirs, or inline records)") from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        opened = path  # no /proc (not Linux): the resolved path was checked already
    if not _inside(opened, dirs):
        os.close(fd)
        raise _refuse(f"dataset.path {source!r} changed while it was read (it now leads outside "
                      "--dataset-dirs); submit the job again")
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, a device
        os.close(fd)
        raise _refuse(f"dataset.path {source!r} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_file(path: Path, source: str, settings: TrainerSettings) -> list[dict]:
    """The chat records of a checked file (422 naming the line when one is not a chat record).
    They are copied into the job, so editing the file later does not change what it trains on."""
    with _open_inside(path, source, settings.allowed_dataset_dirs) as fh:
        if os.fstat(fh.fileno()).st_size > MAX_DATASET_FILE_BYTES:
            raise _refuse(f"dataset.path {source!r} is larger than {MAX_DATASET_FILE_BYTES} bytes")
        records = []
        try:
            for number, raw in enumerate(fh, start=1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    records.append(ChatRecord.model_validate_json(line).model_dump())
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(p) for p in err.get("loc", ())) or "record"
                    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                    raise _refuse(f"dataset.path {source!r} line {number} is not a chat record "
                                  f'{{"messages": [{{"role", "content"}}, ...]}}: {where}: {msg}') from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _refuse(f"cannot read dataset.path {source!r}: {exc}") from None
    if not records:
        raise _refuse(f"dataset.path {source!r} holds no records: it needs at least one "
                      '{"messages": [...]} line')
    return records


# -- eval.include_path ----------------------------------------------------------------------------
INCLUDE_PARAM = "eval.include_path"
# The worker re-checks include_path against the folders the service allowed (os.pathsep-separated).
TASK_DIRS_ENV = "NEGSPACE_TRAINER_TASK_DIRS"


def check_include_path(source: str, dirs: list[Path]) -> Path:
    """The resolved folder of lm-eval task YAML if it lies inside one of ``dirs`` (the trainer's
    ``--task-dirs``); 422 with ``param`` ``eval.include_path`` otherwise. lm-eval imports Python
    from there (``!function``), so the same rules as ``dataset.path`` apply: ``~``, ``..`` and
    symlinks are resolved first, a relative path is taken inside the first folder, and outside
    paths are refused without being looked at (the answer does not reveal whether they exist)."""
    def refuse(message: str) -> BadRequestError:
        return BadRequestError(message, param=INCLUDE_PARAM, status_code=422)

    try:
        raw = Path(source).expanduser()
        path = (raw if raw.is_absolute() else dirs[0] / raw).resolve()
    except (OSError, ValueError, RuntimeError):
        raise refuse(f"eval.include_path {source!r} is not a usable folder path") from None
    if not _inside(path, dirs):
        raise refuse(f"eval.include_path {source!r} is outside the folders this trainer may load "
                     f"lm-eval tasks from ({', '.join(map(str, dirs))}; symlinks and '..' are "
                     "resolved first), because task YAML can import Python (!function); put the "
                     "task folder there, or have the operator add its folder to --task-dirs / "
                     "TRAINER_TASK_DIRS")
    if not path.is_dir():
        raise refuse(f"eval.include_path {source!r} is not a folder on the trainer's machine (give "
                     "a folder of lm-eval task YAML inside --task-dirs; GET /tasks shows the "
                     "shipped one)")
    return path
