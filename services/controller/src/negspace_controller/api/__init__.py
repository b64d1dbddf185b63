"""Thin routers: parse, call ``Controller`` (``serving.py``), return the contracts' models."""

from negspace_controller.api.collections import router as collections_router
from negspace_controller.api.comparisons import router as comparisons_router
from negspace_controller.api.embeddings import router as embeddings_router
from negspace_controller.api.health import router as health_router

__all__ = ["collections_router", "comparisons_router", "embeddings_router", "health_router"]
