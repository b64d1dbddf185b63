"""``python -m negspace_trainer --port 8003 [--workdir DIR]``."""

from __future__ import annotations

from collections.abc import Sequence

from negspace_servekit.serve import run_service

from negspace_trainer.app import create_app
from negspace_trainer.settings import TrainerSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("trainer", TrainerSettings, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
