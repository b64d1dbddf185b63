"""Benchmarks print their figures and record them in ``docs/benchmarks.md``.

Each benchmark owns one section between ``<!-- bench:NAME -->`` markers and replaces only
that section, so running one benchmark never erases another's figures.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

HEADER = ("# Benchmarks\n\nFigures written by the `make bench-*` commands on the machine named in each "
          "section. Ratios compare measurements taken in the same run (the machine is shared and "
          "noisy); absolute numbers vary between runs.\n")


def docs_path() -> Path:
    root = Path(os.environ.get("NEGSPACE_REPO") or Path(__file__).resolve().parents[4])
    return root / "docs" / "benchmarks.md"


def machine_line() -> str:
    return (f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def record_section(name: str, markdown: str, path: Path | None = None) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``markdown``."""
    path = path or docs_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def log(msg: str) -> None:
    """A benchmark's progress line."""
    print(f"[bench] {msg}", flush=True)


def publish(name: str, markdown: str, *, record: bool = True, path: Path | None = None) -> Path | None:
    """Print a benchmark's figures and, unless ``record`` is false (``--no-record``), write them as
    section ``name`` of docs/benchmarks.md; returns the file written, or None."""
    print(markdown, flush=True)
    if not record:
        return None
    written = record_section(name, markdown, path)
    log(f"recorded in {written}")
    return written
