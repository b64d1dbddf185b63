"""sentence-transformers embedders: the model on torch, or on ONNX Runtime (``onnx_embed``) on CPU.

The same model's vectors either way (~1e-7), so the embedder ``name`` does not depend on the
backend. Importing this module imports neither torch nor sentence-transformers: constructing
an embedder does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from negspace_controller.embedding import Embedder, resolve_model, sentence_embedding_dimension, token_lengths

log = logging.getLogger("negspace.controller")


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model. ``backend="onnx"`` runs it on ONNX Runtime when it can (CPU,
    a Transformer + Pooling/Dense/Normalize pipeline, an export that matches torch) and otherwise
    on torch, with one log line saying why; ``backend`` then says which one runs."""

    def __init__(self, model: str = "", *, batch_size: int = 64, device: str | None = None,
                 backend: str = "torch", onnx_dir: Path | None = None, **kw) -> None:
        super().__init__(**kw)
        from sentence_transformers import SentenceTransformer

        if backend not in ("torch", "onnx"):
            raise ValueError(f"embedder backend must be torch or onnx, not {backend!r}")
        self.source, self.name = resolve_model(model)
        log.info("loading embedder %s", self.source)
        self.model = SentenceTransformer(self.source, device=device)
        self.batch_size = batch_size
        self.dimension = sentence_embedding_dimension(self.model)
        self.max_tokens = int(self.model.max_seq_length)
        self.backend = "torch"
        self.onnx = self._onnx(onnx_dir) if backend == "onnx" else None

    def _onnx(self, cache_root: Path | None):
        """The ONNX Runtime encoder, or None (torch) with the one log line that says why."""
        if self.model.device.type != "cpu":
            log.info("embedder %s: torch on %s (ONNX Runtime is used on CPU only)", self.name, self.model.device)
            return None
        from negspace_controller.onnx_embed import encoder_for

        onnx = encoder_for(self.model, self.name, cache_root, source=self.source)
        if onnx is None:
            return None
        self.backend = "onnx"
        log.info("embedder %s: ONNX Runtime (%d threads), %s %s", self.name, onnx.threads,
                 "exported to" if onnx.exported else "cached export", onnx.path)
        return onnx

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        lengths = token_lengths(self.model.tokenizer, texts)
        if self.onnx is not None:
            vecs = self.onnx.encode(texts, self.batch_size)
        else:
            vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return vecs, [n > self.max_tokens for n in lengths]
