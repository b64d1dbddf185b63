"""Where the node's engines find model resolution: it lives in ``negspace_models`` (shared by every
service and the CLI); this name stays for the engines and ``python -m negspace_node.models``."""

from negspace_models import *  # noqa: F403
from negspace_models import main

if __name__ == "__main__":
    raise SystemExit(main())
