"""``build_embedder(setting, ...)``: the one place an embedder setting becomes an embedder, and
it imports only the backend chosen ('fake': the hashing fake; 'onnx' with a serving manifest:
tokenizers + ONNX Runtime, no torch (``onnx_serve``); else sentence-transformers, on torch or ONNX
Runtime). ``Embedder`` (what every embedder provides) lives in ``embedding``."""

from __future__ import annotations

from negspace_controller.embedding import Embedder
from negspace_controller.testing import HashingFakeEmbedder

__all__ = ["Embedder", "HashingFakeEmbedder", "build_embedder"]


def build_embedder(setting: str, *, manifest: bool = True, **kw) -> Embedder:
    """``manifest=False`` skips the torch-free ONNX start (the export is then checked against torch,
    and the manifest written again when missing)."""
    if setting.strip().lower() == "fake":
        for key in ("batch_size", "device", "backend", "onnx_dir"):
            kw.pop(key, None)
        return HashingFakeEmbedder(**kw)
    if kw.get("backend") == "onnx" and manifest:
        from negspace_controller.onnx_serve import manifest_embedder

        emb = manifest_embedder(setting, **{k: v for k, v in kw.items() if k != "backend"})
        if emb is not None:
            return emb
    from negspace_controller.st_embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(setting, **kw)
