"""Issue 22 item 4: the Qdrant server image is the same version in docker-compose.yml, .env.example
and deploy/k8s/qdrant.yaml, and one the locked qdrant-client supports (it warns on a server more
than one minor version away, and collection metadata, which the controller records, needs >= 1.16)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def locked(package: str) -> str:
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not in requirements/lock.txt")


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = version.lstrip("v").split(".")
    return int(major), int(minor_)


def pinned_versions() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["qdrant"]["image"]
    (default,) = re.findall(r"^qdrant/qdrant:\$\{QDRANT_VERSION:-(v[\d.]+)\}$", compose)
    (env,) = re.findall(r"^QDRANT_VERSION=(v[\d.]+)$", (ROOT / ".env.example").read_text(), re.M)
    k8s = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "qdrant.yaml").read_text())
           if d and d["kind"] == "StatefulSet"][0]
    (container,) = k8s["spec"]["template"]["spec"]["containers"]
    image, tag = container["image"].split(":")
    assert image == "qdrant/qdrant"
    return {"docker-compose.yml": default, ".env.example": env, "deploy/k8s/qdrant.yaml": tag}


def test_qdrant_server_is_pinned_alike_and_supported_by_the_locked_client():
    versions = pinned_versions()
    assert len(set(versions.values())) == 1, f"one Qdrant version everywhere: {versions}"
    server = minor(next(iter(versions.values())))
    client = minor(locked("qdrant-client"))
    assert server[0] == client[0] and abs(server[1] - client[1]) <= 1, (
        f"qdrant-client {client} supports servers one minor version apart, not {server}")
    assert server >= (1, 16), "collection metadata (embedder, owner) needs a server >= 1.16"


def test_the_client_itself_agrees():
    """qdrant-client's own compatibility rule, where it is installed."""
    import pytest

    version_check = pytest.importorskip("qdrant_client.common.version_check")
    server = next(iter(pinned_versions().values())).lstrip("v")
    assert version_check.is_compatible(locked("qdrant-client"), server)
