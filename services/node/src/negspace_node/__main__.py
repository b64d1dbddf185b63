"""``python -m negspace_node --engine {vllm,transformers} --model MODEL --dtype ... --port 8001``.

Every flag is also a ``NODE_*`` environment variable (``NODE_ENGINE``, ``NODE_MODEL``...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from negspace_servekit import parse_settings
from negspace_servekit.serve import serve
from pydantic import ValidationError

from negspace_node.app import create_app
from negspace_node.settings import NodeSettings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(NodeSettings, argv if argv is not None else sys.argv[1:], prog="negspace-node")
    except ValidationError as exc:   # a bad flag or NODE_* value: say which, exit 2 like argparse
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                             for e in exc.errors())
        print(f"negspace-node: error: {problems}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except ValueError as exc:  # unknown engine, vllm not installed
        print(f"negspace-node: error: {exc}", file=sys.stderr)
        return 2
    serve(app, settings, "node")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
