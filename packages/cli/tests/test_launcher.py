"""The launcher with stand-in services (tiny HTTP servers started as ``python -m negspace_<svc>``
from a folder put first on PYTHONPATH): health wait, failures named with their log, clean stops
of whole process groups (no orphans), foreground Ctrl-C and background up/down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from negspace_cli import launcher
from negspace_servekit.testing import free_ports

STANDIN = r'''
import http.server, json, os, signal, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = __spec__.name.split(".")[0].removeprefix("negspace_")
mode = os.environ.get("STANDIN_" + name.upper(), "ok")
print(name, "starting with", args, flush=True)
if mode == "crash":
    print("boom: cannot load the model", flush=True)
    sys.exit(3)
# a grandchild in the same process group, like vLLM's engine process or a trainer worker
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(os.path.join(os.environ["STANDIN_DIR"], name + ".child"), "w").write(str(child.pid))
open(os.path.join(os.environ["STANDIN_DIR"], name + ".token"), "w").write(os.environ.get("NEGSPACE_API_TOKEN", ""))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready_at = time.monotonic() + float(os.environ.get("STANDIN_DELAY", "0.3"))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = mode != "never" and time.monotonic() >= ready_at
        body = json.dumps({"status": "ok" if ok else "loading", "service": name,
                           "detail": None if ok else "loading the model"}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture
def standins(tmp_path, monkeypatch):
    root = tmp_path / "standins"
    for svc in launcher.SERVICES:
        pkg = root / f"negspace_{svc}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "__main__.py").write_text(STANDIN)
    monkeypatch.setenv("PYTHONPATH", str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("STANDIN_DIR", str(tmp_path))
    monkeypatch.setenv("NEGSPACE_HOME", str(tmp_path / "home"))
    return tmp_path


def config(tmp_path, **kw) -> launcher.StackConfig:
    ports = dict(zip(launcher.SERVICES, free_ports(4), strict=True))
    return launcher.StackConfig(ports=ports, logs_dir=tmp_path / "logs", engine="transformers",
                                health_timeout_s=kw.pop("timeout", 20), grace_s=kw.pop("grace", 3), **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # zombies of ours are gone for good
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def children(tmp_path) -> list[int]:
    return [int(p.read_text()) for p in tmp_path.glob("*.child")]


def wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_commands_wire_the_services_together():
    cfg = launcher.StackConfig(engine="vllm", node_kv_cache_gib=1.0)
    orch = cfg.command("orchestrator")
    assert orch[1:3] == ["-m", "negspace_orchestrator"]
    assert orch[orch.index("--node-url") + 1] == "http://127.0.0.1:8001"
    assert orch[orch.index("--controller-url") + 1] == "http://127.0.0.1:8002"
    assert orch[orch.index("--trainer-url") + 1] == "http://127.0.0.1:8003"
    node = cfg.command("node")
    assert node[node.index("--engine") + 1] == "vllm" and node[node.index("--kv-cache-gib") + 1] == "1.0"
    trainer = cfg.command("trainer")  # calls point one way: the trainer is told of no other service
    assert not any(a.endswith("-url") for a in trainer), trainer
    assert launcher.StackConfig(host="0.0.0.0").url("node") == "http://127.0.0.1:8001"


def test_start_waits_for_every_health_and_stop_leaves_no_process(standins):
    stack = launcher.Stack(config(standins), echo=lambda m: None)
    stack.start()
    try:
        for svc in stack.services.values():
            assert svc.alive()
        kids = children(standins)
        assert len(kids) == 4 and all(alive(p) for p in kids)
        assert "starting with" in (standins / "logs" / "node.log").read_text()
    finally:
        stack.stop()
    pids = [s.pid for s in stack.services.values()] + kids
    assert wait_gone(pids) == []


def test_every_service_gets_one_token_created_once_and_private(standins, monkeypatch):
    monkeypatch.delenv("NEGSPACE_API_TOKEN", raising=False)
    stack = launcher.Stack(config(standins), echo=lambda m: None)
    with stack:
        tokens = {p.stem: p.read_text() for p in standins.glob("*.token")}
    path = standins / "home" / launcher.TOKEN_FILE_NAME
    assert set(tokens) == set(launcher.SERVICES)
    assert len(set(tokens.values())) == 1 and len(tokens["node"]) >= 32
    assert path.read_text().strip() == tokens["node"]
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    # the CLI's clients find the same token; a later stack reuses it
    assert launcher.resolve_api_token() == tokens["node"]
    assert launcher.StackConfig().env()["NEGSPACE_API_TOKEN"] == tokens["node"]
    # the environment wins over the file
    monkeypatch.setenv("NEGSPACE_API_TOKEN", "from-the-env")
    assert launcher.resolve_api_token() == "from-the-env"
    assert launcher.StackConfig().env()["NEGSPACE_API_TOKEN"] == "from-the-env"


def test_one_service_is_killed_with_its_group_and_restarted(standins):
    stack = launcher.Stack(config(standins), echo=lambda m: None)
    with stack:
        old_pid, old_child = stack.services["controller"].pid, int((standins / "controller.child").read_text())
        stack.kill("controller")
        assert not stack.services["controller"].alive() and wait_gone([old_pid, old_child]) == []
        assert stack.services["controller"].proc.returncode == -signal.SIGKILL
        assert all(stack.services[s].alive() for s in ("node", "trainer", "orchestrator"))
        with pytest.raises(launcher.LaunchError, match="node .* is still running"):
            stack.restart("node")
        stack.restart("controller")
        assert stack.services["controller"].alive() and stack.services["controller"].pid != old_pid
        assert stack.first_dead() is None
    assert wait_gone([s.pid for s in stack.services.values()] + children(standins)) == []


def test_a_service_that_crashes_is_named_with_its_log_and_the_rest_stopped(standins, monkeypatch):
    monkeypatch.setenv("STANDIN_CONTROLLER", "crash")
    stack = launcher.Stack(config(standins), echo=lambda m: None)
    with pytest.raises(launcher.LaunchError) as info:
        stack.start()
    msg = str(info.value)
    assert msg.startswith("controller exited with code 3") and "boom: cannot load the model" in msg
    assert wait_gone([s.pid for s in stack.services.values()] + children(standins)) == []


def test_a_service_never_healthy_times_out_with_its_health_detail(standins, monkeypatch):
    monkeypatch.setenv("STANDIN_TRAINER", "never")
    stack = launcher.Stack(config(standins, timeout=3), echo=lambda m: None)
    with pytest.raises(launcher.LaunchError, match=r"trainer was not healthy after 3s \(loading: loading the model\)"):
        stack.start()
    assert wait_gone([s.pid for s in stack.services.values()] + children(standins)) == []


def test_a_process_ignoring_sigterm_is_killed_after_the_grace(standins, monkeypatch):
    monkeypatch.setenv("STANDIN_NODE", "stubborn")
    stack = launcher.Stack(config(standins, grace=1), echo=lambda m: None)
    stack.start()
    t = time.monotonic()
    stack.stop()
    assert time.monotonic() - t < 8
    assert wait_gone([s.pid for s in stack.services.values()] + children(standins)) == []


def test_a_busy_port_is_refused_before_anything_starts(standins):
    cfg = config(standins)
    first = launcher.Stack(cfg, services=("node",), echo=lambda m: None)
    first.start()
    try:
        with pytest.raises(launcher.LaunchError, match="node: something already answers"):
            launcher.Stack(cfg, echo=lambda m: None).start()
    finally:
        first.stop()


def _cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "negspace_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or os.environ.copy(), **kw)


def _port_args(ports):
    return [a for s, p in zip(launcher.SERVICES, ports, strict=True) for a in (f"--{s}-port", str(p))]


def test_foreground_up_prints_urls_and_ctrl_c_stops_everything(standins):
    ports = free_ports(4)
    proc = _cli(["up", "--engine", "transformers", "--logs", str(standins / "logs"), "--grace", "3",
                 *_port_args(ports)])
    out = ""
    deadline = time.monotonic() + 30
    while "Ctrl-C stops them all" not in out and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
    assert "Ctrl-C stops them all" in out, out
    for s, p in zip(launcher.SERVICES, ports, strict=True):
        assert f"http://127.0.0.1:{p}" in out, (s, out)
    kids = children(standins)
    assert len(kids) == 4
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "stopping every service" in rest
    assert wait_gone(kids) == []


def test_background_up_then_down(standins):
    ports = free_ports(4)
    proc = _cli(["up", "--background", "--engine", "transformers", "--logs", str(standins / "logs"),
                 "--grace", "3", *_port_args(ports)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "every service is healthy" in out
    state = json.loads((standins / "home" / launcher.PID_FILE_NAME).read_text())
    assert state["status"] == "ready" and set(state["services"]) == set(launcher.SERVICES)
    pids = [state["pid"]] + [s["pid"] for s in state["services"].values()] + children(standins)
    assert all(alive(p) for p in pids)
    # a second `up` is refused while this one runs
    again = _cli(["up", *_port_args(ports)])
    assert again.wait(timeout=30) == 1 and "already running" in again.stdout.read()
    down = _cli(["down", "--grace", "3"])
    out, _ = down.communicate(timeout=60)
    assert down.returncode == 0, out
    assert wait_gone(pids) == []
    assert not (standins / "home" / launcher.PID_FILE_NAME).exists()
    # nothing to stop is not an error
    assert _cli(["down"]).wait(timeout=30) == 0


class _RecordingStack:
    def __init__(self, events: list, fail: Exception | None = None):
        self.events, self.fail = events, fail

    def start(self):
        self.events.append("start")
        if self.fail is not None:
            raise self.fail

    def stop(self):
        self.events.append("stop")


class _Oops(RuntimeError):
    pass


@pytest.mark.parametrize(("raised", "code", "said"), [
    (None, 0, []),
    (_Oops("bad run"), 1, ["err: bad run"]),
    (KeyboardInterrupt(), 130, ["err: stopped, rerun"]),
])
def test_run_on_stack_starts_runs_and_always_stops_saying_why_first(raised, code, said):
    events: list = []

    def work():
        events.append("work")
        if raised is not None:
            raise raised

    before = signal.getsignal(signal.SIGTERM)
    got = launcher.run_on_stack(_RecordingStack(events), work, on_sigterm=lambda *a: None, errors=(_Oops,),
                                err=lambda m: events.append(f"err: {m}"), interrupted="stopped, rerun")
    assert got == code
    assert events == ["start", "work", *said, "stop"]          # the message before the (slow) stop
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_on_stack_reports_a_failed_start_and_lets_other_errors_through():
    events: list = []
    assert launcher.run_on_stack(_RecordingStack(events, launcher.LaunchError("node died")), lambda: None,
                                 on_sigterm=lambda *a: None, errors=(), err=events.append) == 1
    assert events == ["start", "node died", "stop"]
    with pytest.raises(ValueError):
        launcher.run_on_stack(None, lambda: int("x"), on_sigterm=lambda *a: None, errors=(), err=events.append)
