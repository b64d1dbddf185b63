"""``python -m negspace_orchestrator --port 8000 --node-url URL [--node-url URL ...] --controller-url URL [--controller-url URL ...]``."""

from __future__ import annotations

from collections.abc import Sequence

from negspace_servekit.serve import run_service

from negspace_orchestrator.app import create_app
from negspace_orchestrator.settings import OrchestratorSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("orchestrator", OrchestratorSettings, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
