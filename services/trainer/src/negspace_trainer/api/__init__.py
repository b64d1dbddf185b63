"""Thin routers: parse, call ``Trainer`` (``serving.py``), return the contracts' models."""

from negspace_trainer.api.health import router as health_router
from negspace_trainer.api.jobs import router as jobs_router
from negspace_trainer.api.tasks import router as tasks_router

__all__ = ["health_router", "jobs_router", "tasks_router"]
