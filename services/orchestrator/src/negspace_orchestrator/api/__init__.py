"""Thin routers: parse, call ``Orchestrator`` (``serving.py``), return the contracts' models."""

from negspace_orchestrator.api.datasets import router as datasets_router
from negspace_orchestrator.api.health import router as health_router
from negspace_orchestrator.api.runs import router as runs_router
from negspace_orchestrator.api.train import router as train_router

__all__ = ["datasets_router", "health_router", "runs_router", "train_router"]
