"""Acceptance (issue 6): one Dockerfile per service whose CMD starts the module that exists
(the same ``python -m negspace_<svc>`` as locally), on a slim base, as a non-root user, with the
dependency layer before the source layer."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("node", "controller", "orchestrator", "trainer")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.fixture(params=SERVICES)
def service(request) -> tuple[str, list[tuple[str, str]]]:
    path = ROOT / "services" / request.param / "Dockerfile"
    assert path.is_file(), f"services/{request.param}/Dockerfile is missing"
    return request.param, instructions(path)


def test_cmd_starts_the_service_module(service):
    name, ins = service
    cmds = [rest for word, rest in ins if word == "CMD"]
    assert cmds, f"{name}: no CMD"
    cmd = json.loads(cmds[-1])  # exec form, so signals reach Python (clean shutdown)
    assert cmd[:3] == ["python", "-m", f"negspace_{name}"], f"{name}: CMD is {cmd}"
    module = cmd[2]
    assert importlib.util.find_spec(module) is not None, f"{name}: module {module} does not exist"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{name}: {module} has no __main__"
    assert (ROOT / "services" / name / "src" / module / "__main__.py").is_file()


def test_slim_base_and_non_root_user(service):
    name, ins = service
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and all("slim" in f for f in froms), f"{name}: base images {froms}"
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name}: runs as {users or 'root'}"


def test_dependency_layer_before_source_layer(service):
    name, ins = service
    words = [(w, r) for w, r in ins]
    src_copy = next(i for i, (w, r) in enumerate(words)
                    if w == "COPY" and re.search(rf"services/{name}\b", r))
    dep_install = next((i for i, (w, r) in enumerate(words) if w == "RUN" and "pip install" in r), None)
    assert dep_install is not None and dep_install < src_copy, \
        f"{name}: dependencies must be installed before the service source is copied"
