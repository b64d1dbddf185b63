"""``python -m negspace_orchestrator --port 8000 --node-url URL [--node-url URL ...] --controller-url URL``."""

from __future__ import annotations

import sys

from negspace_servekit.serve import serve
from negspace_servekit.settings import parse_settings

from negspace_orchestrator.app import create_app
from negspace_orchestrator.settings import OrchestratorSettings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(OrchestratorSettings, argv if argv is not None else sys.argv[1:],
                              prog="negspace-orchestrator")
    serve(create_app(settings), settings, "orchestrator")


if __name__ == "__main__":
    main()
