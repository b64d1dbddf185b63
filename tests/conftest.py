"""Fixtures of the top-level tests (importlib mode: helpers live here as fixtures).

``local_stack``: a ``negspace`` command that starts the real services as local processes through
the launcher, everything in the test's tmp_path: ``local_stack.flags`` are the flags every such
command takes (free ports, ``--out``/``--data-dir``/``--logs``, the orchestrator URL), ``.out`` the
``--out`` folder, ``.main(args)`` runs the CLI in this process, ``.logs()`` the services' log tails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from negspace_servekit.testing import free_ports

SERVICES = ("orchestrator", "node", "controller", "trainer")


class LocalStack:
    def __init__(self, tmp_path: Path) -> None:
        ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.out = tmp_path / "runs"
        self.log_dir = tmp_path / "logs"
        self.flags = ["--out", str(self.out), "--data-dir", str(tmp_path / "data"), "--logs", str(self.log_dir),
                      "--orchestrator-url", f"http://127.0.0.1:{ports['orchestrator']}"]
        for svc, port in ports.items():
            self.flags += [f"--{svc}-port", str(port)]

    @staticmethod
    def main(args: list[str]) -> int:
        from negspace_cli import __main__ as cli

        return cli.main(args)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
def local_stack(tmp_path, monkeypatch) -> LocalStack:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NEGSPACE_ORCHESTRATOR_URL", raising=False)
    return LocalStack(tmp_path)
