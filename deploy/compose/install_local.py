"""Install one negspace distribution and every negspace-* distribution it depends on, by path
from the build context (no index), without their third-party dependencies (the image's dependency
layer has those). Following pyproject.toml means a package that moves (say, model resolution into
a shared package) needs no Dockerfile edit.

    python deploy/compose/install_local.py negspace-trainer      # run from the context root (/app)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path


def local_distributions(root: Path) -> dict[str, Path]:
    found = {}
    for pyproject in [*root.glob("packages/*/pyproject.toml"), *root.glob("services/*/pyproject.toml")]:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        found[name.lower().replace("_", "-")] = pyproject.parent
    return found


def closure(name: str, dists: dict[str, Path]) -> list[Path]:
    order: list[Path] = []
    todo, seen = [name], set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        if dist not in dists:
            sys.exit(f"install_local: {dist} is not under packages/ or services/ in the build context")
        order.append(dists[dist])
        project = tomllib.loads((dists[dist] / "pyproject.toml").read_text())["project"]
        for req in project.get("dependencies", []):
            dep = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
            if dep.startswith("negspace-"):
                todo.append(dep)
    return order


def main() -> None:
    dists = local_distributions(Path.cwd())
    paths = closure(sys.argv[1], dists)
    print("install_local:", " ".join(str(p) for p in paths), flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir",
                    *map(str, paths)], check=True)


if __name__ == "__main__":
    main()
