"""FakeEngine: a deterministic stand-in for the node's model, ONLY for unit tests of other layers.

It needs no model files and no torch work: its tokenizer is byte-level (one token per UTF-8
byte) with a tiny chat template, and its "generation" is a sentence of words picked by a hash
of everything that matters to the real engines: the prompt ids, the negatives, the guidance
scale and space, the temperature and top_p, the choice index and, when sampling
(``temperature > 0``), the seed. Greedy requests (``temperature == 0``) ignore the seed, as
a real model does. So the same request always gives the same text, and a retry with another
seed, other negatives or another scale gives another text.

A mocked node for the orchestrator's (or anyone's) tests, in-process, no lifespan needed
(a FakeEngine is ready as soon as it is built):

    import httpx
    from negspace_contracts.node import NodeClient, ChatCompletionRequest
    from negspace_node.app import create_app
    from negspace_node.engines.fake import FakeEngine
    from negspace_node.settings import NodeSettings

    engine = FakeEngine()
    app = create_app(NodeSettings(), engine=engine)
    client = NodeClient("http://node", transport=httpx.ASGITransport(app=app))
    reply = await client.chat.create(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                                           negative_prompts=["hello"], guidance_scale=3))
    engine.requests[-1]          # the GenerationRequest the API built (token ids, scale, ...)

Knobs to simulate the real thing: ``delay`` (seconds per request, for back-pressure tests),
``fail_with`` (every request kills the engine with that reason: 503, /health says why),
``start_error`` / ``start_delay`` (for a failed or slow start when the lifespan runs it),
``model_name``, ``max_model_len``.
"""

from __future__ import annotations

import asyncio
import hashlib

from negspace_node.engines.base import Engine, EngineError, GenerationOutput, GenerationRequest, TextSink
from negspace_node.engines.stopping import StopChecker

FAKE_MODEL_NAME = "fake-model"

_WORDS = (
    "write explain compare describe list summarize design imagine plan analyze a an the short "
    "detailed simple poem story recipe question essay guide letter plan dialogue about for on of "
    "ocean city garden robot history music river winter market teacher planet bridge library "
    "forest kitchen train island museum festival volcano desert village engine painting science "
    "friendship storm harbor mountain"
).split()


class FakeTokenizer:
    """Byte-level tokenizer with a ChatML-like template; ids 0-2 are special (pad, bos, eos)."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    _OFFSET = 3

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            **_: object):
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self._OFFSET for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(i - self._OFFSET for i in ids if i >= self._OFFSET)
        return data.decode("utf-8", errors="replace")


class FakeEngine(Engine):
    """Deterministic, instant, model-free. See the module docstring for how to use it."""

    name = "fake"

    def __init__(self, settings=None, *, model_name: str = FAKE_MODEL_NAME, max_model_len: int | None = None,
                 delay: float = 0.0, fail_with: str | None = None, start_error: str | None = None,
                 start_delay: float = 0.0) -> None:
        super().__init__()
        self._name = (getattr(settings, "served_model_name", None) or model_name)
        self._max_len = max_model_len or getattr(settings, "max_model_len", None) or 2048
        self._tokenizer = FakeTokenizer()
        self.delay = delay
        self.fail_with = fail_with
        self.start_error = start_error
        self.start_delay = start_delay
        self.requests: list[GenerationRequest] = []
        self._in_flight = 0
        # Ready at once, so tests that never run the app lifespan can use it; a start_error or
        # start_delay means the test wants to watch the lifespan's start, so begin "loading".
        self.state = "loading" if (start_error or start_delay) else "ready"

    async def start(self) -> None:
        if self.start_delay:
            self.status_detail = "fake engine loading"
            await asyncio.sleep(self.start_delay)
        if self.start_error:
            self.fail(self.start_error)
            return
        self.state, self.status_detail = "ready", None


    async def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> list[GenerationOutput]:
        self.ensure_ready()
        self.requests.append(request)
        self._in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_with:
                self.fail(self.fail_with)
                raise EngineError(f"engine {self.name} failed: {self.fail_with}")
            return [self._one(request, i, on_text) for i in range(request.n)]
        finally:
            self._in_flight -= 1

    def _one(self, request: GenerationRequest, choice: int, on_text: TextSink | None = None) -> GenerationOutput:
        key = repr((request.prompt_ids, request.negative_ids if request.guided else [],
                    request.guidance.scale if request.guided else 1.0,
                    request.guidance.space if request.guided else "logits",
                    (request.guidance.combine, request.guidance.alpha, request.guidance.max_tokens)
                    if request.guided else None, request.min_p,
                    request.temperature, request.top_p,
                    request.seed if request.temperature > 0 else None, choice))
        digest = hashlib.sha256(key.encode()).digest()
        count = 6 + digest[0] % 10
        words = [_WORDS[b % len(_WORDS)] for b in digest[1:1 + count]]
        text = " ".join(words).capitalize() + "?"
        checker = StopChecker(self._tokenizer, {FakeTokenizer.eos_token_id}, request.stop,
                              request.max_tokens, len(request.prompt_ids),
                              on_text=None if on_text is None else (lambda text: on_text(choice, text)))
        for token in self._tokenizer.encode(text, add_special_tokens=False) + [FakeTokenizer.eos_token_id]:
            if checker.add(token):
                break
        return checker.output()
