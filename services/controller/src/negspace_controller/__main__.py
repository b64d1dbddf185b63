"""``python -m negspace_controller --port 8002`` (every flag is also a ``CONTROLLER_*`` variable)."""

from __future__ import annotations

import sys

from negspace_servekit.serve import serve
from negspace_servekit.settings import parse_settings

from negspace_controller.app import SERVICE, create_app
from negspace_controller.settings import ControllerSettings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(ControllerSettings, sys.argv[1:] if argv is None else argv,
                              prog="negspace-controller")
    serve(create_app(settings), settings, SERVICE)


if __name__ == "__main__":
    main()
