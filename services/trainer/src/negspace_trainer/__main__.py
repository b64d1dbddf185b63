"""``python -m negspace_trainer --port 8003`` (flags, or ``TRAINER_*`` environment variables)."""

from __future__ import annotations

import sys

from negspace_servekit import parse_settings
from negspace_servekit.serve import serve

from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(TrainerSettings, argv if argv is not None else sys.argv[1:],
                              prog="python -m negspace_trainer")
    serve(create_app(settings), settings, "trainer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
