"""The server side every negspace service shares, written once.

Why a second shared package: ``negspace_contracts`` must stay importable without FastAPI or
uvicorn (it is the clients' package); the pieces here (settings base, error envelope mapping,
bearer auth, body-size limit, Prometheus middleware, serving) would otherwise be copied into
four services.
"""

from negspace_servekit.app import create_app, health_response
from negspace_servekit.settings import ServiceSettings, parse_settings

__all__ = ["ServiceSettings", "create_app", "health_response", "parse_settings"]
