"""Shapes every service shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: The environment variable every service and client reads the shared API token from.
TOKEN_ENV = "NEGSPACE_API_TOKEN"


def negspace_home() -> Path:
    """``$NEGSPACE_HOME`` (default ``~/.cache/negspace``): models, Qdrant data, databases."""
    return Path(os.environ.get("NEGSPACE_HOME") or Path.home() / ".cache" / "negspace").expanduser()


class StrictModel(BaseModel):
    """Internal API models: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class HealthResponse(BaseModel):
    """``GET /health``: 200 with status ``ok``; 503 with ``loading`` or ``error`` and why."""

    status: Literal["ok", "loading", "error"]
    service: str
    version: str = "0.1.0"
    detail: str | None = None
    info: dict[str, object] = {}
