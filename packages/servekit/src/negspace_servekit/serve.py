"""Run a service app with uvicorn: the one entry point behind every ``python -m negspace_*``."""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from negspace_servekit.settings import ServiceSettings, parse_settings

S = TypeVar("S", bound=ServiceSettings)

log = logging.getLogger("negspace")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: FastAPI, settings: ServiceSettings, service: str) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.token:
        log.info("%s: bearer-token authentication is on (every route but /health)", service)
    elif _is_loopback(settings.host):
        log.warning("%s: NEGSPACE_API_TOKEN is not set: authentication is off, so the service "
                    "only listens on %s (loopback)", service, settings.host)
    else:
        log.warning("%s: NEGSPACE_API_TOKEN is not set and the service listens on %s: ANYONE who "
                    "can reach this address can use it", service, settings.host)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10)


def settings_error_message(exc: ValidationError) -> str:
    """``--flag: what is wrong`` for each invalid flag or environment value."""
    return "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                     for e in exc.errors())


def run_service(service: str, settings_cls: type[S], build_app: Callable[[S], FastAPI],
                argv: Sequence[str] | None = None) -> int:
    """The body of every ``python -m negspace_<service>``: parse flags over environment
    variables, build the app, serve it. A bad flag or value exits 2 naming it (like argparse),
    never with a traceback."""
    prog = f"negspace-{service}"
    try:
        settings = parse_settings(settings_cls, list(argv) if argv is not None else sys.argv[1:], prog=prog)
    except ValidationError as exc:
        print(f"{prog}: error: {settings_error_message(exc)}", file=sys.stderr)
        return 2
    try:
        app = build_app(settings)
    except ValueError as exc:  # e.g. an unknown engine, a missing optional package
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    serve(app, settings, service)
    return 0
