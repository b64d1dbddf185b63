"""Helpers for tests that run a node app in-process (this service's and other layers').

    app = create_app(NodeSettings(), engine=FakeEngine())
    async with serving(app), asgi_client(app) as http:
        await http.post("/v1/completions", json={"prompt": "hi"})

``serving`` runs the app's lifespan (httpx's ASGITransport does not) and waits until the
engine finished starting; a FakeEngine is ready without it.
"""

from __future__ import annotations

import contextlib

import httpx


@contextlib.asynccontextmanager
async def serving(app):
    async with app.router.lifespan_context(app):
        task = app.state.engine_task
        if task is not None:
            await task
        yield app


def asgi_client(app, base_url: str = "http://node") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, timeout=120)


def chat_ids(tokenizer, text: str) -> list[int]:
    """A user turn rendered with the chat template, generation prompt appended (as the API does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)
