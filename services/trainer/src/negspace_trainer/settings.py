"""Trainer settings: every flag of ``python -m negspace_trainer`` is also a ``TRAINER_*`` variable
(list flags repeat, or take comma-separated values in the environment)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from negspace_contracts.common import negspace_home
from negspace_servekit.settings import ServiceSettings, split_commas
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

# A URL prefix must name its host and end it with "/": "https://example.com" would also allow
# "https://example.com.evil.org/...".
_URL_PREFIX = re.compile(r"^https?://[^/?#@\\\s]+/")


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_")  # the rest is ServiceSettings' (merged)

    port: int = Field(8003, ge=0, le=65535)
    workdir: Path | None = Field(None, description="Jobs, artifacts and the job database; "
                                 "default $NEGSPACE_HOME/trainer.")
    default_base_model: str = Field("", description="Base model when a job names none "
                                    "(empty = bundled SmolLM2-135M-Instruct).")
    max_queued: int = Field(100, ge=1, description="Jobs waiting before POST /jobs answers 429.")
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts a job gets when trainer restarts "
                              "interrupt it; it is queued again until then, and fails after.")
    dataset_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders whose files a job's dataset.path may name; repeat "
                                          "the flag for several (default: <workdir>/datasets only).")
    dataset_url_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="http(s) URL prefixes a job's dataset.path may start with, "
                                          "e.g. https://data.example.org/negspace/ (default: none, "
                                          "URLs are refused).")
    task_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders a job's eval.include_path may name (lm-eval task "
                                          "YAML can import Python from there via !function); repeat "
                                          "the flag for several (default: <workdir>/tasks only, "
                                          "where the shipped local tasks are written).")
    poll_interval_s: float = Field(0.5, gt=0, description="How often a running worker's progress is read.")
    cancel_grace_s: float = Field(10.0, ge=0, description="SIGTERM -> SIGKILL delay when cancelling.")
    worker_threads: int | None = Field(None, ge=1, description="torch threads in a worker (default: torch's).")

    @field_validator("dataset_dirs", "task_dirs", mode="before")
    @classmethod
    def _dirs(cls, v: object) -> object:
        return split_commas(v)

    @field_validator("dataset_url_prefixes", mode="before")
    @classmethod
    def _prefixes(cls, v: object) -> object:
        v = split_commas(v)
        if isinstance(v, list):
            for prefix in v:
                if not _URL_PREFIX.match(prefix):
                    raise ValueError(f"{prefix!r} is not an http(s) URL prefix that names its host and "
                                     "ends the host with '/' (e.g. https://data.example.org/negspace/)")
        return v

    @property
    def resolved_workdir(self) -> Path:
        return (self.workdir or negspace_home() / "trainer").expanduser().resolve()

    @property
    def allowed_dataset_dirs(self) -> list[Path]:
        """The folders dataset.path may read from, symlinks resolved."""
        dirs = self.dataset_dirs or [self.resolved_workdir / "datasets"]
        return [Path(d).expanduser().resolve() for d in dirs]

    @property
    def allowed_task_dirs(self) -> list[Path]:
        """The folders eval.include_path may name, symlinks resolved."""
        dirs = self.task_dirs or [self.resolved_workdir / "tasks"]
        return [Path(d).expanduser().resolve() for d in dirs]
