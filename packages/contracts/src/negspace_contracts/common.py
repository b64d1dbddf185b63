"""Shapes every service shares."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


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
