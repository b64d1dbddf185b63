"""Model resolution shared by every service and the CLI, without depending on any service package:
``resolve_model`` (hub id, local folder or the bundled SmolLM2) and ``prepare_once`` (a folder built
once under a lock and published atomically)."""

from negspace_models.bundled import (
    BUNDLED_NAME,
    ModelResolutionError,
    ResolvedModel,
    bundled_model_dir,
    models_dir,
    prepare_bundled,
    resolve_model,
    served_model_name,
)
from negspace_models.once import prepare_once

__all__ = ["BUNDLED_NAME", "ModelResolutionError", "ResolvedModel", "bundled_model_dir", "models_dir",
           "prepare_bundled", "prepare_once", "resolve_model", "served_model_name"]
