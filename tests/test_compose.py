"""Acceptance (issue 6): the compose file validates with Debian's docker-compose and describes the
deployment the README promises (health checks, healthy dependencies, one published port, named
volumes, a GPU reservation, a CPU profile, nodes reachable by one service name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("node", "controller", "orchestrator", "trainer")
INSTALL_HINT = ("docker-compose is not installed: `apt-get install -y docker-compose` "
                "(Debian's 1.29 validates without a Docker engine; `make setup` installs it as root)")

needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None, reason=INSTALL_HINT)


def compose(*args: str, token: str | None = "test-token") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NEGSPACE_API_TOKEN"}
    if token is not None:
        env["NEGSPACE_API_TOKEN"] = token
    # an empty --env-file: what the file says without a user's .env (make compose-up writes one)
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run(["docker-compose", "--env-file", empty.name, "-f", str(COMPOSE), *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def resolved() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip(INSTALL_HINT)
    r = compose("--profile", "cpu", "config")
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@needs_compose
def test_compose_file_validates():
    r = compose("config", "-q")
    assert r.returncode == 0, r.stderr
    r = compose("--profile", "cpu", "config", "-q")
    assert r.returncode == 0, r.stderr


@needs_compose
def test_missing_token_is_refused_with_a_message():
    r = compose("config", "-q", token=None)
    assert r.returncode != 0
    assert "NEGSPACE_API_TOKEN" in r.stderr


def test_env_example_names_every_variable_the_compose_file_reads():
    import re

    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#") and "=" in line}
    assert used - example == set(), f"add to .env.example: {sorted(used - example)}"


def test_every_service_has_a_health_check_on_health(resolved):
    for name, svc in resolved["services"].items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no health check"
        if name != "qdrant":
            assert "/health" in " ".join(hc["test"]), f"{name}'s health check does not call /health"


def test_dependencies_wait_for_healthy(resolved):
    s = resolved["services"]
    assert s["orchestrator"]["depends_on"] == {n: {"condition": "service_healthy"}
                                               for n in ("node", "controller", "trainer")}
    assert s["controller"]["depends_on"] == {"qdrant": {"condition": "service_healthy"}}


def test_only_the_orchestrator_is_published(resolved):
    published = {n for n, s in resolved["services"].items() if s.get("ports")}
    assert published == {"orchestrator"}
    assert str(resolved["services"]["orchestrator"]["ports"][0]["target"]) == "8000"


def test_named_volumes_for_models_qdrant_and_runs(resolved):
    assert {"models", "qdrant", "runs"} <= set(resolved["volumes"])
    def sources(svc: dict) -> set[str]:  # 1.29 prints "name:/path:rw", newer ones a mapping
        return {v["source"] if isinstance(v, dict) else v.split(":")[0] for v in svc.get("volumes", [])}

    mounts = {n: sources(s) for n, s in resolved["services"].items()}
    assert "qdrant" in mounts["qdrant"] and "runs" in mounts["orchestrator"] and "models" in mounts["node"]


def test_gpu_node_reserves_an_nvidia_device_and_cpu_node_is_a_profile(resolved):
    s = resolved["services"]
    devices = s["node"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "profiles" not in s["node"]
    assert s["node-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in s["node-cpu"]
    # replicas of both variants answer to `node`, the one URL the orchestrator is given
    assert "node" in s["node-cpu"]["networks"]["default"]["aliases"]
    assert s["orchestrator"]["environment"]["ORCHESTRATOR_NODE_URL"] == "http://node:8001"
    # scaling needs no fixed container name or host port on the nodes
    for n in ("node", "node-cpu"):
        assert "container_name" not in s[n] and not s[n].get("ports")


def test_services_are_configured_by_environment_with_one_token(resolved):
    s = resolved["services"]
    for name in SERVICES:
        env = s[name]["environment"]
        assert env["NEGSPACE_API_TOKEN"] == "test-token", name
        prefix = name.upper() + "_"
        assert env[f"{prefix}HOST"] == "0.0.0.0", name
    assert s["controller"]["environment"]["CONTROLLER_QDRANT_URL"] == "http://qdrant:6333"
    assert s["orchestrator"]["environment"]["ORCHESTRATOR_CONTROLLER_URL"] == "http://controller:8002"
    assert s["orchestrator"]["environment"]["ORCHESTRATOR_TRAINER_URL"] == "http://trainer:8003"
    # calls point one way: the orchestrator pushes datasets, the trainer knows no other service
    assert not any(k.endswith("_URL") for k in s["trainer"]["environment"]), s["trainer"]["environment"]


def test_every_build_names_an_existing_dockerfile(resolved):
    for name, svc in resolved["services"].items():
        if "build" not in svc:
            continue
        dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


@needs_compose
def test_gpu_node_replicas_each_get_their_own_device(tmp_path):
    """`NODES=2 make compose-gpus`: the generated override puts replica i on GPU i (a plain
    `--scale node=2` would give both the same device), both answering to the name `node`."""
    import sys

    out = tmp_path / "docker-compose.gpus.yml"
    gen = subprocess.run([sys.executable, str(ROOT / "deploy" / "compose" / "gpu_nodes.py"), "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    assert "test-token" not in out.read_text() and "${NEGSPACE_API_TOKEN" in out.read_text()
    r = compose("-f", str(out), "config")
    assert r.returncode == 0, r.stderr
    s = yaml.safe_load(r.stdout)["services"]
    gpu_nodes = {n: svc for n, svc in s.items() if svc.get("deploy", {}).get("resources", {}).get("reservations")}
    assert set(gpu_nodes) == {"node", "node-1"}
    devices = {n: svc["deploy"]["resources"]["reservations"]["devices"] for n, svc in gpu_nodes.items()}
    assert all(len(d) == 1 and d[0]["driver"] == "nvidia" and "count" not in d[0] for d in devices.values())
    assert devices["node"][0]["device_ids"] == ["0"] and devices["node-1"][0]["device_ids"] == ["1"]
    assert s["node-1"]["networks"]["default"]["aliases"] == ["node"]
    assert s["node-1"]["image"] == s["node"]["image"] == "negspace-node:gpu"
    assert s["node-1"]["environment"] == s["node"]["environment"] and s["node-1"]["shm_size"]
