"""``negspace_home``: the one rule, defined with the other shared conventions in ``negspace_contracts.common``."""

from negspace_contracts.common import negspace_home

__all__ = ["negspace_home"]
