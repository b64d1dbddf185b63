"""Trainer settings: every flag of ``python -m negspace_trainer`` is also a ``TRAINER_*`` variable."""

from __future__ import annotations

from pathlib import Path

from negspace_servekit.home import negspace_home
from negspace_servekit.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore", cli_kebab_case=True,
                                      cli_implicit_flags=True, cli_avoid_json=True)

    port: int = Field(8003, ge=0, le=65535)
    workdir: Path | None = Field(None, description="Jobs, artifacts and the job database; "
                                 "default $NEGSPACE_HOME/trainer.")
    orchestrator_url: str = Field("http://127.0.0.1:8000",
                                  description="Where datasets given by run_id are fetched.")
    default_base_model: str = Field("", description="Base model when a job names none "
                                    "(empty = bundled SmolLM2-135M-Instruct).")
    max_queued: int = Field(100, ge=1, description="Jobs waiting before POST /jobs answers 429.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often a running worker's progress is read.")
    cancel_grace_s: float = Field(10.0, ge=0, description="SIGTERM -> SIGKILL delay when cancelling.")
    worker_threads: int | None = Field(None, ge=1, description="torch threads in a worker (default: torch's).")

    @property
    def resolved_workdir(self) -> Path:
        return (self.workdir or negspace_home() / "trainer").expanduser().resolve()
