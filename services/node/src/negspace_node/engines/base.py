"""The small abstract base every generation engine implements.

The API layer renders prompts (chat template) and tokenizes; an engine only turns token ids
into token ids. One ``GenerationRequest`` is one positive prompt plus 0-16 negative prompts;
with negatives and a ``guidance.scale != 1`` the engine decodes them as one *group* with
classifier-free guidance (see ``negspace_node.guidance`` for the exact math), otherwise it is
plain generation.

Engines:
- ``vllm``         production: cross-row V1 logits processor + gang scheduler (engines/vllm/)
- ``transformers`` exact reference and fallback: one padded batch with a KV cache
- ``fake``         deterministic stand-in, ONLY for unit tests of other layers
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from negspace_contracts.errors import NegspaceError, ServiceUnavailableError
from negspace_contracts.node import Guidance

EngineState = Literal["loading", "ready", "error", "stopped"]
FinishReason = Literal["stop", "length"]
#: ``on_text(choice, text)``: choice ``choice``'s text so far that can no longer change (see
#: ``StopChecker.stable_text``), each time it grows. Engines call it from their own thread.
TextSink = Callable[[int, str], None]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    negative_ids: list[list[int]] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    guidance: Guidance = Guidance()    # scale (1 = none), space, combine, alpha, interval
    min_p: float = 0.0                       # after temperature, before top-p; 0 = off
    stop: tuple[str, ...] = ()         # stop strings (not included in the output)
    n: int = 1                         # choices; 1 whenever there are negatives
    request_id: str = ""

    @property
    def guided(self) -> bool:
        """True when decoding must run the group with CFG (negatives, a scale != 1 and at least
        one guided position: ``guidance.max_tokens == 0`` is plain generation)."""
        return bool(self.negative_ids) and self.guidance.scale != 1.0 and self.guidance.max_tokens != 0

    def guides_at(self, position: int) -> bool:
        """Whether completion position ``position`` (0-based) is decoded with guidance; past
        ``guidance.max_tokens`` the group decodes plainly from the positive (as if s = 1)."""
        return self.guided and self.guidance.guides_at(position)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int


class EngineError(ServiceUnavailableError):
    """The engine failed or is not ready: the API answers 503 and /health says why."""


class RequestFailedError(NegspaceError):
    """Decoding THIS request failed (e.g. its scores had no finite token): it answers 500 with the
    reason; the engine and every other request go on."""

    status_code = 500
    error_type = "generation_error"


class GuidanceGroupError(NegspaceError):
    """A guided group could not be decoded together (an incomplete group, or members whose
    tokens diverged). The request fails loudly instead of returning unguided text."""

    status_code = 500
    error_type = "guidance_group_error"


class Engine(abc.ABC):
    """One loaded model. ``start()`` loads it (slow, called from the app lifespan)."""

    name: str = "abstract"

    def __init__(self) -> None:
        self.state: EngineState = "loading"
        self.error: str | None = None
        # What a loading engine is doing now (shown by /health while it answers 503).
        self.status_detail: str | None = None
        # Set by each engine (at construction, refined once loaded); served by the properties below.
        self._name: str = ""
        self._max_len: int = 0
        self._tokenizer = None
        self._in_flight: int = 0

    # -- lifecycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; set ``state`` to ready, or to error with ``error`` set."""

    async def stop(self) -> None:
        self.state = "stopped"

    # -- what the API needs ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """Name served in /v1/models and in responses."""
        return self._name

    @property
    def max_model_len(self) -> int:
        """Context length: prompt + max_tokens must fit, for the positive and every negative."""
        return self._max_len

    @property
    def tokenizer(self):
        """A Hugging Face tokenizer (``apply_chat_template``, ``encode``, ``decode``)."""
        return self._tokenizer

    def queue_depth(self) -> int:
        """Requests accepted but not finished (for /metrics and back-pressure)."""
        return self._in_flight

    def validate(self, request: GenerationRequest) -> None:
        """Raise a 4xx ``NegspaceError`` for what this engine could never run (called by
        ``generate``, and by the API before a stream starts so such a request gets a 4xx).
        The default accepts everything (the API's own checks suffice for the engine)."""
        return None

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> list[GenerationOutput]:
        """Return ``request.n`` outputs. Raise EngineError when the engine cannot serve.
        ``on_text`` (streaming) hears each choice's stable text as it grows."""

    def fail(self, reason: str) -> None:
        """Mark the engine dead: /health answers 503 with ``reason``; requests get 503."""
        self.state = "error"
        self.error = reason

    def ensure_ready(self) -> None:
        if self.state != "ready":
            raise EngineError(f"engine {self.name} is {self.state}" + (f": {self.error}" if self.error else ""))
