"""``stream: true``: one generation as server-sent events in OpenAI's chunk format.

    data: {chunk}\\n\\n ...  data: [DONE]\\n\\n

Chat (``chat.completion.chunk``): each choice's first chunk carries ``delta: {"role":
"assistant", "content": ""}``, then ``delta: {"content": ...}`` as text is decoded, and its last
chunk ``delta: {}`` with the ``finish_reason``. Completions (``text_completion``): ``text`` deltas,
then ``text: ""`` with the ``finish_reason``. With ``stream_options.include_usage`` one more chunk
with ``choices: []`` and the ``usage`` comes before ``[DONE]``. The first chunk also carries the
request's ``guidance`` (what the non-streamed response has).

The text comes from the engine's ``on_text`` (``StopChecker.stable_text``: only text no later
token can change), so the concatenated deltas equal the non-streamed text exactly; the rest of
each choice is sent from the final output.

An error after the stream started (the engine failed, the deadline passed, the group broke) is
one event ``data: {"error": {message, type, param, code}}`` (the node's error envelope, which
the official ``openai`` client raises as ``APIError``) followed by ``[DONE]``: never a broken
connection. A client that goes away mid-stream closes the generator: the generation is
cancelled, which aborts the whole group in the engine (its rows and KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from negspace_contracts.errors import NegspaceError, ServerError
from negspace_contracts.node import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    GuidanceInfo,
    Usage,
    completion_id,
)
from pydantic import BaseModel

from negspace_node.engines.base import GenerationOutput, GenerationRequest, TextSink

log = logging.getLogger("negspace.node")

#: Runs the generation with a text sink (``NodeService._run``, deadline and metrics included).
Generation = Callable[[TextSink], Awaitable[list[GenerationOutput]]]
DONE = "data: [DONE]\n\n"
_END = object()


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def text_deltas(run: Generation, n: int) -> AsyncIterator[tuple[int, str] | list[GenerationOutput]]:
    """Yield ``(choice, new text)`` as the engine decodes, then the outputs (after the last delta
    of every choice). Closing the iterator early cancels the generation."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def on_text(choice: int, text: str) -> None:        # the engine's thread
        with contextlib.suppress(RuntimeError):         # the event loop is closed: nobody listens
            loop.call_soon_threadsafe(inbox.put_nowait, (choice, text))

    task = asyncio.ensure_future(run(on_text))
    task.add_done_callback(lambda _: inbox.put_nowait(_END))
    sent = [""] * n
    try:
        while (item := await inbox.get()) is not _END:
            choice, text = item
            if len(text) > len(sent[choice]) and text.startswith(sent[choice]):
                delta, sent[choice] = text[len(sent[choice]):], text
                yield choice, delta
        outputs = task.result()
        for choice, output in enumerate(outputs):
            if not output.text.startswith(sent[choice]):     # a tokenizer whose text is not prefix-stable
                log.warning("streamed text of choice %d is not a prefix of its final text", choice)
            elif len(output.text) > len(sent[choice]):
                yield choice, output.text[len(sent[choice]):]
        yield outputs
    finally:
        if not task.done():          # the client went away (or the server stops): abort the generation
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _error_event(exc: BaseException) -> str:
    if not isinstance(exc, NegspaceError):
        log.exception("streamed generation failed", exc_info=exc)
        exc = ServerError(f"the generation failed: {type(exc).__name__}: {exc}")
    return sse(exc.to_response())


def usage(outputs: list[GenerationOutput]) -> Usage:
    prompt = outputs[0].prompt_tokens if outputs else 0
    completion = sum(len(o.token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def chat_events(run: Generation, request: GenerationRequest, model: str, guidance: GuidanceInfo, *,
                      include_usage: bool = False) -> AsyncIterator[str]:
    head = dict(id=completion_id("chatcmpl"), created=int(time.time()), model=model)
    n = request.n
    yield sse(ChatCompletionChunk(**head, guidance=guidance, choices=[
        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n)]))
    try:
        async for item in text_deltas(run, n):
            if isinstance(item, tuple):
                yield sse(ChatCompletionChunk(**head, choices=[
                    ChatChunkChoice(index=item[0], delta=ChatDelta(content=item[1]))]))
                continue
            for i, output in enumerate(item):
                yield sse(ChatCompletionChunk(**head, choices=[
                    ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=output.finish_reason)]))
            if include_usage:
                yield sse(ChatCompletionChunk(**head, choices=[], usage=usage(item)))
    except Exception as exc:  # noqa: BLE001 - after the stream started an error is an event, not a 5xx
        yield _error_event(exc)
    yield DONE


async def completion_events(run: Generation, request: GenerationRequest, model: str, guidance: GuidanceInfo, *,
                            include_usage: bool = False) -> AsyncIterator[str]:
    head = dict(id=completion_id("cmpl"), created=int(time.time()), model=model)
    n = request.n
    first = True
    try:
        async for item in text_deltas(run, n):
            if isinstance(item, tuple):
                yield sse(CompletionChunk(**head, guidance=guidance if first else None, choices=[
                    CompletionChunkChoice(index=item[0], text=item[1])]))
                first = False
                continue
            for i, output in enumerate(item):
                yield sse(CompletionChunk(**head, guidance=guidance if first else None, choices=[
                    CompletionChunkChoice(index=i, text="", finish_reason=output.finish_reason)]))
                first = False
            if include_usage:
                yield sse(CompletionChunk(**head, choices=[], usage=usage(item)))
    except Exception as exc:  # noqa: BLE001 - after the stream started an error is an event, not a 5xx
        yield _error_event(exc)
    yield DONE
