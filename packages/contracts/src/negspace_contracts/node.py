"""Node API: OpenAI-compatible completions with classifier-free guidance extras.

Standard OpenAI fields keep their meaning (``temperature: 0`` is greedy). Our extras travel in
the body (``extra_body`` in the official OpenAI client):

- ``negative_prompts``: up to ``MAX_NEGATIVES`` texts; in chat completions each is rendered with
  the same chat template as the positive, as one user turn with the generation prompt appended.
- ``guidance_scale``: ``s`` in ``guided = ln + s * (lp - ln)``; 1.0 means no guidance.
- ``guidance_space``: ``logits`` (raw logits, the reference) or ``logprobs`` (log-softmax,
  as in the CFG paper).

``stream: true`` answers server-sent events in OpenAI's chunk format (``ChatCompletionChunk`` /
``CompletionChunk``, then ``data: [DONE]``), guided or plain.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from negspace_contracts._http import CLIENT_DEFAULT, Resource, ServiceClient

MAX_NEGATIVES = 16
MAX_STOP_SEQUENCES = 8

GuidanceSpace = Literal["logits", "logprobs"]
GuidanceCombine = Literal["min", "mean", "max"]
FinishReason = Literal["stop", "length", "error"]
#: The wire names of ``Guidance``'s fields in a request body (flat, like vLLM's extra sampling params).
GUIDANCE_WIRE = {"scale": "guidance_scale", "space": "guidance_space", "combine": "guidance_combine",
                 "alpha": "guidance_alpha", "max_tokens": "guidance_max_tokens"}


class Guidance(BaseModel):
    """How one generation is guided: defined once here and passed as one value from a run's
    schedule (``GuidanceSchedule.at``) through the request (``ChatCompletionRequest(guidance=...)``,
    ``request.guidance``) to the node's engines and its vLLM logits processor. On the HTTP wire it
    travels as the flat ``guidance_*`` extras (``GUIDANCE_WIRE``), so OpenAI-style clients keep
    working."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(1.0, description="s in guided = ln + s * (lp - ln); 1.0 = no guidance; finite, >= 0.")
    space: GuidanceSpace = Field("logits", description="logits (raw logits, the reference) or logprobs "
                                                       "(log-softmax, as in the CFG paper).")
    combine: GuidanceCombine = Field(
        "min", description="How the negatives' scores are combined element-wise before guidance: "
                           "min (the reference), mean or max (push away from what ANY negative favours).")
    alpha: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Plausibility restriction (as in contrastive decoding, Li et al. 2023): at a guided step, "
                    "tokens whose probability under the positive alone (softmax of its raw logits, "
                    "temperature 1) is < alpha x the positive's top probability get -inf; the positive's "
                    "top token always survives. None or 0 = no restriction.")
    max_tokens: int | None = Field(
        None, ge=0, description="Guide only completion positions 0..N-1, then decode plainly from the "
                                "positive, as if the scale were 1 (a guidance interval). 0 = plain "
                                "generation; None = guide every token.")

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("guidance_scale must be a finite number >= 0 (1.0 = no guidance)")
        return v

    def wire(self) -> dict[str, object]:
        """The request-body extras (``guidance_scale``, ...) that carry this value."""
        return {GUIDANCE_WIRE[k]: v for k, v in self.model_dump().items()}

    def guides_at(self, position: int) -> bool:
        """Whether completion position ``position`` (0-based) is inside the guidance interval."""
        return self.max_tokens is None or position < self.max_tokens


class TextPart(BaseModel):
    """OpenAI's content-part form (``[{"type": "text", "text": ...}]``); only text is supported."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="'developer' (OpenAI's newer name) is rendered as 'system'.")
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict[str, str]:
        """The message as a chat template expects it."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send one more chunk before [DONE] with the usage "
                                                   "and no choices (every other chunk has usage null).")


class _SamplingFields(BaseModel):
    """Fields shared by chat and raw completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name; omitted or equal to the served one.")
    max_tokens: int | None = Field(None, ge=1, description="Defaults to 256, capped by the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16, description="Number of choices; must be 1 with negatives.")
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format, ending with "
                                            "'data: [DONE]' (guided or plain). An error after the stream "
                                            "started arrives as one event {\"error\": {...}} before [DONE].")
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    user: str | None = None
    negative_prompts: list[str] = Field(default_factory=list, max_length=MAX_NEGATIVES)
    # Guidance's fields, flat on the wire (read them together as ``request.guidance``).
    guidance_scale: float = Guidance.model_fields["scale"]
    guidance_space: GuidanceSpace = Guidance.model_fields["space"]
    guidance_combine: GuidanceCombine = Guidance.model_fields["combine"]
    guidance_alpha: float | None = Guidance.model_fields["alpha"]
    guidance_max_tokens: int | None = Guidance.model_fields["max_tokens"]
    min_p: float = Field(0.0, ge=0.0, le=1.0,
                         description="Drop tokens whose probability is < min_p x the top token's, after "
                                     "temperature and before top_p (vLLM's order); 0 = off. Applies to plain "
                                     "and guided decoding; no effect when temperature is 0.")

    @model_validator(mode="before")
    @classmethod
    def _spread_guidance(cls, data):
        """``guidance=Guidance(...)`` sets the five flat ``guidance_*`` fields (a Python-side
        constructor only: on the wire the fields stay flat, and a nested ``guidance`` object is an
        unknown field)."""
        if isinstance(data, dict) and isinstance(data.get("guidance"), Guidance):
            data = dict(data)
            g = data.pop("guidance")
            clash = [w for w in GUIDANCE_WIRE.values() if w in data]
            if clash:
                raise ValueError(f"give guidance or {', '.join(clash)}, not both")
            data.update(g.wire())
        return data

    @field_validator("guidance_scale")
    @classmethod
    def _finite_scale(cls, v: float) -> float:
        return Guidance._finite_scale(v)

    @property
    def guidance(self) -> Guidance:
        """The request's guidance options as one value."""
        return Guidance(**{k: getattr(self, w) for k, w in GUIDANCE_WIRE.items()})

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @field_validator("negative_prompts")
    @classmethod
    def _negatives(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("negative_prompts must not contain empty strings")
        return v

    @model_validator(mode="after")
    def _guided_needs_single_choice(self):
        if self.n > 1 and self.negative_prompts:
            raise ValueError("n must be 1 when negative_prompts are given (guided decoding "
                             "produces one sequence per request)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1,
                                        description="At least one message; the last is usually the user's.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; "
                                              "wins when both are given.")


class CompletionRequest(_SamplingFields):
    prompt: str = Field(..., min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GuidanceInfo(BaseModel):
    """What guided the answer (the request's ``Guidance`` and how many negatives it had)."""

    scale: float
    num_negatives: int
    space: GuidanceSpace = "logits"
    combine: GuidanceCombine = "min"
    alpha: float | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, guidance: Guidance, num_negatives: int) -> GuidanceInfo:
        return cls(**guidance.model_dump(), num_negatives=num_negatives)

    @property
    def guidance(self) -> Guidance:
        return Guidance(scale=self.scale, space=self.space, combine=self.combine, alpha=self.alpha,
                        max_tokens=self.max_tokens)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    guidance: GuidanceInfo

    @property
    def text(self) -> str:
        return self.choices[0].message.content


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    guidance: GuidanceInfo

    @property
    def text(self) -> str:
        return self.choices[0].text


class ChatDelta(BaseModel):
    """What a chat chunk adds: the role in a choice's first chunk, then content; ``{}`` in the last."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``object: chat.completion.chunk``). Every
    chunk of a stream shares ``id`` and ``created``; ``guidance`` is set on the first chunk only;
    ``usage`` only on the extra last chunk (no choices) asked for by ``stream_options.include_usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    guidance: GuidanceInfo | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``object: text_completion``, as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    guidance: GuidanceInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "negspace"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Chat(Resource):
    async def create(self, request: ChatCompletionRequest, *, timeout: float | None = CLIENT_DEFAULT) -> ChatCompletionResponse:
        return await self._client.call("POST", "/v1/chat/completions", ChatCompletionResponse,
                                       json_body=request.model_dump(mode="json", exclude_none=True),
                                       timeout=timeout)


class _Completions(Resource):
    async def create(self, request: CompletionRequest, *, timeout: float | None = CLIENT_DEFAULT) -> CompletionResponse:
        return await self._client.call("POST", "/v1/completions", CompletionResponse,
                                       json_body=request.model_dump(mode="json", exclude_none=True),
                                       timeout=timeout)


class _Models(Resource):
    async def list(self) -> ModelList:
        return await self._client.call("GET", "/v1/models", ModelList)


class NodeClient(ServiceClient):
    """``NodeClient(url).chat.create(ChatCompletionRequest(...))``."""

    def __init__(self, base_url: str, **kw) -> None:
        super().__init__(base_url, **kw)
        self.chat = _Chat(self)
        self.completions = _Completions(self)
        self.models = _Models(self)
