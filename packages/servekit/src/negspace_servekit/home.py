from __future__ import annotations

import os
from pathlib import Path


def negspace_home() -> Path:
    """``$NEGSPACE_HOME`` (default ``~/.cache/negspace``): models, Qdrant data, databases."""
    return Path(os.environ.get("NEGSPACE_HOME") or Path.home() / ".cache" / "negspace").expanduser()
