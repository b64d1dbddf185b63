"""Run a service app with uvicorn: the one entry point behind every ``python -m negspace_*``."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn
from fastapi import FastAPI

from negspace_servekit.settings import ServiceSettings

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
