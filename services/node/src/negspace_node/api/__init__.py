"""Thin routers: parse, call ``NodeService``, return the contracts' models."""

from negspace_node.api.health import router as health_router
from negspace_node.api.openai import router as openai_router

__all__ = ["health_router", "openai_router"]
