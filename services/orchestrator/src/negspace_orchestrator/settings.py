"""Orchestrator settings: every flag of ``python -m negspace_orchestrator`` is also an
``ORCHESTRATOR_*`` variable (list flags repeat, or take comma-separated values in the env)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from negspace_contracts.common import negspace_home
from negspace_servekit.settings import ServiceSettings, split_commas
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict


def check_url(url: str) -> str:
    """A service base URL: http(s), with a host."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"service URLs must start with http:// or https:// (got {url!r})")
    if not url.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(f"service URL {url!r} names no host")
    return url


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_")  # the rest is ServiceSettings' (merged)

    port: int = Field(8000, ge=0, le=65535)
    node_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Node base URL; repeat the flag for several (each may be a "
                                          "load-balanced set of replicas).")
    controller_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Controller base URL; repeat the flag for several replicas. "
                                          "Each run's collection lives on one of them, chosen when the "
                                          "run is created and recorded with it: adding a URL never moves "
                                          "a run, removing one pauses the runs that live there.")
    trainer_url: str | None = Field(None, description="Trainer base URL (needed by /runs/{id}/train only).")
    db: Path | None = Field(None, description="SQLite file; default $NEGSPACE_HOME/orchestrator.db.")
    data_dir: Path | None = Field(None, description="Exports (Q/A JSONL, datasets folders); default "
                                                    "$NEGSPACE_HOME/orchestrator.")
    round_mode: Literal["concurrent", "sequential"] = Field(
        "concurrent", description="concurrent: the nodes of a round work at once; sequential: one after "
                                  "another, exactly like the reference.")
    node_timeout_s: float = Field(300.0, gt=0, description="Per generation request.")
    controller_timeout_s: float = Field(60.0, gt=0)
    trainer_timeout_s: float = Field(60.0, gt=0, description="Per trainer request (job creation carries "
                                                             "the Q/A records inline).")
    train_poll_s: float = Field(5.0, gt=0, description="How often a run's training job is polled for "
                                                       "its train events.")
    max_active_runs: int = Field(8, ge=1, le=10_000, description="Runs generating at once; the others wait "
                                                                 "queued, first created first started.")
    max_queued_runs: int = Field(1000, ge=0, le=1_000_000, description="Queued runs beyond which POST /runs "
                                                                       "answers 429 with Retry-After.")
    retry_attempts: int = Field(6, ge=1, le=100, description="Tries per call (moving to the next node "
                                                            "URL each time) before the run is paused.")
    retry_backoff_s: float = Field(0.5, ge=0, description="First backoff; doubles per try, with jitter.")
    retry_max_backoff_s: float = Field(8.0, ge=0)
    health_interval_s: float = Field(5.0, gt=0, description="How often paused runs check whether their "
                                                            "dependencies are back.")
    qa_concurrency: int = Field(4, ge=1, le=256, description="Q/A conversions in flight at once.")

    @field_validator("node_url", "controller_url", mode="before")
    @classmethod
    def _split_urls(cls, v: object) -> object:
        return split_commas(v)

    @field_validator("controller_url", mode="after")
    @classmethod
    def _controller_urls(cls, v: list[str]) -> list[str]:
        """Without a trailing slash, each once: a run records its controller's URL and is routed by
        it, so ``http://c:8002/`` and ``http://c:8002`` must be one replica, not two."""
        urls = [check_url(u).rstrip("/") for u in v]
        dups = sorted({u for u in urls if urls.count(u) > 1})
        if dups:
            raise ValueError(f"--controller-url lists {', '.join(dups)} more than once; each controller "
                             "replica once (every run is routed to one of them by its URL)")
        return urls

    @model_validator(mode="after")
    def _urls(self):
        for url in [*self.node_url, self.trainer_url]:
            if url is not None:
                check_url(url)
        return self

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db is not None else negspace_home() / "orchestrator.db"

    @property
    def exports_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else negspace_home() / "orchestrator"
