"""``python -m negspace_node --engine {vllm,transformers} --model MODEL --dtype ... --port 8001``.

Every flag is also a ``NODE_*`` environment variable (``NODE_ENGINE``, ``NODE_MODEL``...).

Exit codes: 0 after a normal shutdown, 2 for a bad flag, 3 when the engine failed to start or
died (with ``--exit-on-engine-error``, the default): a dead engine never lingers behind an open
port; compose's ``restart:`` or the launcher brings the node back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from negspace_servekit.serve import run_service

from negspace_node.app import create_app
from negspace_node.settings import NodeSettings

ENGINE_DEAD_EXIT = 3
#: If the graceful shutdown after an engine death hangs (a stuck engine thread), exit anyway.
HARD_EXIT_AFTER_S = 30.0


class ExitOnEngineDeath:
    """``on_engine_dead`` for the real process: remember why, then stop uvicorn (SIGTERM to
    ourselves: graceful shutdown, the lifespan stops the engine); a timer makes sure we exit."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        self.reason = reason
        timer = threading.Timer(HARD_EXIT_AFTER_S, os._exit, (ENGINE_DEAD_EXIT,))
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)


    def install(self) -> None:
        """uvicorn re-raises the SIGTERM it caught once it has shut down, with the handler that was
        there before it started: this one, which turns OUR SIGTERM into exit code 3 and leaves
        any other SIGTERM its default meaning."""
        def on_term(signum, _frame):
            if self.reason is not None:
                self.report()
                raise SystemExit(ENGINE_DEAD_EXIT)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_term)

    def report(self) -> None:
        print(f"negspace-node: the engine died: {self.reason}; exiting with code {ENGINE_DEAD_EXIT}",
              file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    watcher = ExitOnEngineDeath()

    def build(settings: NodeSettings):
        if not settings.exit_on_engine_error:
            return create_app(settings)
        if threading.current_thread() is threading.main_thread():
            watcher.install()
        return create_app(settings, on_engine_dead=watcher)

    code = run_service("node", NodeSettings, build, argv)
    if code == 0 and watcher.reason is not None:      # shut down without the re-raised signal
        watcher.report()
        return ENGINE_DEAD_EXIT
    return code


if __name__ == "__main__":
    raise SystemExit(main())
