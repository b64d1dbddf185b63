"""``python -m negspace_node --engine {vllm,transformers} --model MODEL --dtype ... --port 8001``.

Every flag is also a ``NODE_*`` environment variable (``NODE_ENGINE``, ``NODE_MODEL``...).
"""

from __future__ import annotations

from collections.abc import Sequence

from negspace_servekit.serve import run_service

from negspace_node.app import create_app
from negspace_node.settings import NodeSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("node", NodeSettings, create_app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
