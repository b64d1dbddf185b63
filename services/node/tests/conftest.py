"""Shared fixtures for the node's tests.

- ``smol``: the bundled SmolLM2-135M-Instruct in float32, loaded ONCE per test session
  (every slow test module shares it).
- ``serving(app)``: run an app's lifespan and wait until its engine finished starting.
- ``asgi_client(app)``: an httpx client talking to the app in-process.
"""

from __future__ import annotations

import contextlib
import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smol():
    from negspace_node.engines.transformers import load_model
    from negspace_node.models import resolve_model

    return load_model(resolve_model("").path, "float32", device="cpu")


@contextlib.asynccontextmanager
async def serving(app):
    async with app.router.lifespan_context(app):
        task = app.state.engine_task
        if task is not None:
            await task
        yield app


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node", timeout=120)


def chat_ids(tokenizer, text: str) -> list[int]:
    """A user turn rendered with the chat template, generation prompt appended (as the API does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)
