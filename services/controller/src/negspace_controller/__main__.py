"""``python -m negspace_controller --port 8002`` (every flag is also a ``CONTROLLER_*`` variable)."""

from __future__ import annotations

from collections.abc import Sequence

from negspace_servekit.serve import run_service

from negspace_controller.app import SERVICE, create_app
from negspace_controller.settings import ControllerSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(SERVICE, ControllerSettings, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
