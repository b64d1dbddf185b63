"""Shared fixtures for the node's tests. Helpers (serving, asgi_client, chat_ids) live in
``negspace_node.testing`` (importlib import mode cannot import conftest modules).

- ``smol``: the bundled SmolLM2-135M-Instruct in float32, loaded ONCE per test session
  (every slow test module shares it).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smol():
    from negspace_models import resolve_model
    from negspace_node.engines.transformers import load_model

    return load_model(resolve_model("").path, "float32", device="cpu")
