"""A shim kept only for ``negspace_controller.settings`` and ``negspace_orchestrator.settings``
(owned by their own changes): ``negspace_home`` is defined in ``negspace_contracts.common``. Once
those two import it from there, delete this file."""

from negspace_contracts.common import negspace_home

__all__ = ["negspace_home"]
