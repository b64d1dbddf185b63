"""One settings class per service, from flags and ``<PREFIX>_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")

from negspace_contracts.common import TOKEN_ENV  # noqa: E402  (the one definition)


def split_commas(v: object) -> object:
    """A list setting's ``mode="before"`` validator: a repeated flag, or comma-separated values in
    one flag or environment variable, become one flat list of non-empty stripped strings."""
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list):
        out: list[str] = []
        for item in v:
            out.extend(p.strip() for p in str(item).split(",") if p.strip())
        return out
    return v


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``env_prefix`` (``NODE_``, ``CONTROLLER_``...).

    ``api_token`` also comes from ``NEGSPACE_API_TOKEN`` (one token for the whole deployment).
    Without a token the service binds to 127.0.0.1 unless ``--host`` says otherwise.
    """

    model_config = SettingsConfigDict(extra="ignore", cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_avoid_json=True, cli_enforce_required=False)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535)
    api_token: SecretStr | None = Field(None, description=f"Bearer token (or ${TOKEN_ENV}).")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body.")
    log_level: str = Field("info")

    @model_validator(mode="after")
    def _token_from_shared_env(self):
        if self.api_token is None and os.environ.get(TOKEN_ENV):
            self.api_token = SecretStr(os.environ[TOKEN_ENV])
        return self

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None


def parse_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Build settings from command-line flags (kebab-case) over environment variables."""
    return cls(_cli_parse_args=list(argv) if argv is not None else True, _cli_prog_name=prog)
