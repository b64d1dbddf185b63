"""``build_embedder(setting, ...)``: the one place an embedder setting becomes an embedder, and
it imports only the backend chosen ('fake': the hashing fake; else sentence-transformers, on
torch or ONNX Runtime). ``Embedder`` (what every embedder provides) lives in ``embedding``."""

from __future__ import annotations

from negspace_controller.embedding import Embedder
from negspace_controller.testing import HashingFakeEmbedder

__all__ = ["Embedder", "HashingFakeEmbedder", "build_embedder"]


def build_embedder(setting: str, **kw) -> Embedder:
    if setting.strip().lower() == "fake":
        for key in ("batch_size", "device", "backend", "onnx_dir"):
            kw.pop(key, None)
        return HashingFakeEmbedder(**kw)
    from negspace_controller.st_embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(setting, **kw)
