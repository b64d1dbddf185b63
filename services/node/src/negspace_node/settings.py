"""Node settings: every flag of ``python -m negspace_node`` is also a ``NODE_*`` variable."""

from __future__ import annotations

from typing import Literal

from negspace_servekit.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NODE_")  # the rest is ServiceSettings' (merged)

    port: int = Field(8001, ge=0, le=65535)
    engine: Literal["vllm", "transformers", "fake"] | None = Field(
        None, description="Default: vllm when importable, else transformers. 'fake' is for tests only.")
    model: str = Field("", description="A known name (python -m negspace_models list: smollm2-135m, "
                                        "qwen2.5-coder-1.5b; prepared once on first use), a hub id or a local "
                                        "folder; empty = bundled SmolLM2-135M-Instruct.")
    served_model_name: str | None = Field(None, description="Name in /v1/models (default: from the model).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the checkpoint's dtype on GPU; on CPU bfloat16 when the CPU has bf16 units "
                            "and the weights are bfloat16, else float32 (negspace_node.dtype).")
    max_model_len: int = Field(2048, ge=64, description="Context length the node serves.")
    max_num_seqs: int = Field(64, ge=1, description="vLLM: rows decoded per step (a group uses 1 + negatives).")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="vLLM: tokens per step (default max(max_model_len, 4096)); a guided "
                                "group's summed prompts must fit in one step.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM on GPU: GPUs one model is split over (the guidance state travels with "
                             "each request, so the processor works in vLLM's worker processes).")
    max_queue: int = Field(256, ge=1, description="Requests waiting or running before 429.")
    default_max_tokens: int = Field(256, ge=1)
    kv_cache_gib: float = Field(2.0, gt=0, description="vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1.0, description="vLLM on GPU.")
    seed: int = Field(0, ge=0, description="Engine seed (requests carry their own seed).")
    request_timeout_s: float = Field(
        600.0, ge=0, description="Per-request deadline (waiting + decoding); past it the request is "
                                 "aborted, its rows freed, and it answers 503. 0 = no deadline.")
    exit_on_engine_error: bool = Field(
        True, description="Exit the process (code 3) when the engine fails to start or dies, so a "
                          "supervisor (compose restart:, the launcher) brings the node back.")
    engine_error_grace_s: float = Field(
        2.0, ge=0, description="Seconds between the engine's death and the exit, so /health and the "
                               "waiting requests can report it.")
