"""What the node's API does, between the thin routers and the engine.

Renders prompts (chat template for the positive AND each negative), tokenizes, validates
against the engine's context, applies back-pressure, calls the engine, builds the OpenAI-style
response (or, for ``stream: true``, the server-sent events of ``streaming``) and keeps the
Prometheus figures. Engines only see token ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from negspace_contracts.errors import (
    BadRequestError,
    NegspaceError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from negspace_contracts.node import (
    ChatChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GuidanceInfo,
    ModelCard,
    ModelList,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from negspace_node import streaming
from negspace_node.engines.base import Engine, EngineError, GenerationOutput, GenerationRequest, TextSink

log = logging.getLogger("negspace.node")


class ModelNotFoundError(NotFoundError):
    """Like OpenAI's ``model_not_found``: the request names a model this node does not serve."""

    error_type = "model_not_found"


class DeadlineExceededError(ServiceUnavailableError):
    """The request ran past ``--request-timeout-s``: aborted (its rows freed), 503 with Retry-After."""

    error_type = "deadline_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class NodeMetrics:
    """The node's figures, in the app's own registry (``app.state.metrics_registry``)."""

    def __init__(self, registry: CollectorRegistry, queue_depth) -> None:
        self.requests = Counter("negspace_node_requests", "Generation requests by endpoint, mode and outcome",
                                ["endpoint", "mode", "outcome"], registry=registry)
        self.prompt_tokens = Counter("negspace_node_prompt_tokens", "Positive prompt tokens processed",
                                     registry=registry)
        self.negative_prompt_tokens = Counter("negspace_node_negative_prompt_tokens",
                                              "Negative prompt tokens processed (guided requests)",
                                              registry=registry)
        self.completion_tokens = Counter("negspace_node_completion_tokens", "Tokens generated",
                                         registry=registry)
        self.latency = Histogram("negspace_node_generation_seconds", "Time from accepted to answered",
                                 ["endpoint", "mode"], registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.queue_depth = Gauge("negspace_node_queue_depth", "Generation requests in flight (waiting or running)",
                                 registry=registry)
        self.queue_depth.set_function(queue_depth)


class NodeService:
    def __init__(self, settings, engine: Engine, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.engine = engine
        self.in_flight = 0
        self._mean_latency = 1.0
        self.metrics = NodeMetrics(registry, lambda: self.in_flight)

    # -- health and models --------------------------------------------------------------------
    def health(self) -> tuple[str, str | None, dict]:
        engine = self.engine
        info = {"engine": engine.name, "model": engine.model_name, "queue_depth": self.in_flight,
                "max_queue": self.settings.max_queue}
        if engine.state == "ready":
            return "ok", None, {**info, "max_model_len": engine.max_model_len}
        if engine.state == "loading":
            return "loading", f"engine {engine.name} is loading" + (
                f": {engine.status_detail}" if engine.status_detail else ""), info
        return "error", f"engine {engine.name} is {engine.state}" + (f": {engine.error}" if engine.error else ""), info

    def models(self) -> ModelList:
        ready = self.engine.state == "ready"
        return ModelList(data=[ModelCard(id=self.engine.model_name,
                                         max_model_len=self.engine.max_model_len if ready else None)])

    # -- generation ---------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        request = self._chat_request(body)
        outputs = await self._run("chat", request)
        return ChatCompletionResponse(
            model=self.engine.model_name,
            choices=[ChatChoice(index=i, message=ChatCompletionMessage(content=o.text),
                                finish_reason=o.finish_reason) for i, o in enumerate(outputs)],
            usage=streaming.usage(outputs), guidance=self.guidance(request))

    async def complete(self, body: CompletionRequest) -> CompletionResponse:
        request = self._completion_request(body)
        outputs = await self._run("completions", request)
        return CompletionResponse(
            model=self.engine.model_name,
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                     for i, o in enumerate(outputs)],
            usage=streaming.usage(outputs), guidance=self.guidance(request))

    def chat_stream(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        """``stream: true``: everything that can be refused is refused HERE, before the stream
        starts (a 4xx like any request); what fails later is an error event in the stream."""
        request = self._chat_request(body)
        self.engine.validate(request)
        return streaming.chat_events(self._streamed("chat", request), request, self.engine.model_name,
                                     self.guidance(request), include_usage=_include_usage(body))

    def complete_stream(self, body: CompletionRequest) -> AsyncIterator[str]:
        request = self._completion_request(body)
        self.engine.validate(request)
        return streaming.completion_events(self._streamed("completions", request), request,
                                           self.engine.model_name, self.guidance(request),
                                           include_usage=_include_usage(body))

    def _streamed(self, endpoint: str, request: GenerationRequest) -> streaming.Generation:
        return lambda on_text: self._run(endpoint, request, on_text=on_text)

    def _chat_request(self, body: ChatCompletionRequest) -> GenerationRequest:
        self._preflight(body.model)
        tok = self.engine.tokenizer
        prompt = self._render([m.template_dict() for m in body.messages], "messages")
        negatives = [self._render([{"role": "user", "content": n}], f"negative_prompts[{i}]")
                     for i, n in enumerate(body.negative_prompts)]
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        negative_ids = [tok.encode(n, add_special_tokens=False) for n in negatives]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return self._request("chat", body, prompt_ids, negative_ids, max_tokens, "messages")

    def _completion_request(self, body: CompletionRequest) -> GenerationRequest:
        self._preflight(body.model)
        tok = self.engine.tokenizer
        prompt_ids = tok.encode(body.prompt, add_special_tokens=True)
        negative_ids = [tok.encode(n, add_special_tokens=True) for n in body.negative_prompts]
        return self._request("completions", body, prompt_ids, negative_ids, body.max_tokens, "prompt")

    # -- the steps ----------------------------------------------------------------------------
    def _preflight(self, model: str | None) -> None:
        served = self.engine.model_name
        if model not in (None, "", served, self.settings.model or None):
            raise ModelNotFoundError(f"The model {model!r} does not exist on this node; it serves {served!r} "
                                     "(see GET /v1/models, or omit 'model')", param="model")
        self.engine.ensure_ready()
        if self.in_flight >= self.settings.max_queue:
            retry = max(1.0, self._mean_latency)
            self.metrics.requests.labels("any", "any", "rate_limited").inc()
            raise RateLimitError(f"the node is at capacity ({self.settings.max_queue} requests in flight); "
                                 f"retry in about {retry:.0f} s or use another node", retry_after=retry)

    def _render(self, messages: list[dict], param: str) -> str:
        try:
            return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that refuses these messages is the caller's to fix
            raise BadRequestError(f"the model's chat template rejected {param}: {exc}", param=param) from exc

    def _check_lengths(self, prompt_ids: list[int], negative_ids: list[list[int]], max_tokens: int | None,
                       prompt_param: str) -> int:
        ctx = self.engine.max_model_len
        lengths = [(prompt_param, len(prompt_ids))] + [(f"negative_prompts[{i}]", len(n))
                                                       for i, n in enumerate(negative_ids)]
        for param, length in lengths:
            if length >= ctx:
                raise BadRequestError(f"{param} is {length} tokens but the context is {ctx} tokens "
                                      f"(prompt + max_tokens must fit); shorten it", param=param)
        param, longest = max(lengths, key=lambda item: item[1])
        room = ctx - longest
        if max_tokens is None:
            return min(self.settings.default_max_tokens, room)
        if max_tokens > ctx:
            raise BadRequestError(f"max_tokens={max_tokens} exceeds the context length of {ctx} tokens; "
                                  f"use at most {room} with this prompt", param="max_tokens")
        if max_tokens > room:
            raise BadRequestError(f"{param} is {longest} tokens, so max_tokens={max_tokens} does not fit the "
                                  f"{ctx}-token context; use max_tokens <= {room} or a shorter prompt",
                                  param="max_tokens")
        return max_tokens

    def _request(self, endpoint: str, body, prompt_ids: list[int], negative_ids: list[list[int]],
                 max_tokens: int | None, prompt_param: str) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=prompt_ids, negative_ids=negative_ids,
            max_tokens=self._check_lengths(prompt_ids, negative_ids, max_tokens, prompt_param),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            guidance=body.guidance.model_copy(update={"alpha": body.guidance_alpha or None}), min_p=body.min_p,
            stop=tuple(body.stop_list), n=body.n, request_id=f"{endpoint}-{id(body):x}-{time.monotonic_ns()}")

    async def _run(self, endpoint: str, request: GenerationRequest,
                   on_text: TextSink | None = None) -> list[GenerationOutput]:
        """Run ``request`` on the engine under the deadline, with the metrics; map its failures."""
        mode = "guided" if request.guided else "plain"
        self.in_flight += 1
        started = time.perf_counter()
        timeout = self.settings.request_timeout_s or None
        try:
            work = self.engine.generate(request) if on_text is None else self.engine.generate(request, on_text=on_text)
            outputs = await asyncio.wait_for(work, timeout)
        except asyncio.CancelledError:
            self.metrics.requests.labels(endpoint, mode, "cancelled").inc()
            raise
        except TimeoutError as exc:     # wait_for cancelled the engine call: its rows are freed
            self.metrics.requests.labels(endpoint, mode, "timeout").inc()
            raise DeadlineExceededError(
                f"the request did not finish within the node's deadline of {timeout:g} s "
                f"(--request-timeout-s); it was aborted. Retry with a smaller max_tokens or on a less "
                f"busy node", retry_after=max(1.0, self._mean_latency)) from exc
        except NegspaceError as exc:
            self.metrics.requests.labels(endpoint, mode, "engine_error" if exc.status_code >= 500 else
                                         "bad_request").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - an engine bug or a dead backend: 503 and /health says why
            log.exception("engine %s failed on %s", self.engine.name, request.request_id)
            reason = f"{type(exc).__name__}: {exc}"
            self.engine.fail(reason)
            self.metrics.requests.labels(endpoint, mode, "engine_error").inc()
            raise EngineError(f"engine {self.engine.name} failed: {reason}") from exc
        finally:
            self.in_flight -= 1
        elapsed = time.perf_counter() - started
        self._mean_latency = 0.8 * self._mean_latency + 0.2 * elapsed
        m = self.metrics
        m.requests.labels(endpoint, mode, "ok").inc()
        m.latency.labels(endpoint, mode).observe(elapsed)
        m.prompt_tokens.inc(len(request.prompt_ids))
        if request.guided:
            m.negative_prompt_tokens.inc(sum(len(n) for n in request.negative_ids))
        m.completion_tokens.inc(sum(len(o.token_ids) for o in outputs))
        return outputs

    @staticmethod
    def guidance(request: GenerationRequest) -> GuidanceInfo:
        return GuidanceInfo.of(request.guidance, len(request.negative_ids))


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
