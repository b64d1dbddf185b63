"""Test doubles shared by every layer's tests that run the controller (importable: pytest runs
with ``--import-mode=importlib``, so test modules cannot share code through conftest imports)."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from negspace_controller.embedding import Embedder


class HashingFakeEmbedder(Embedder):
    """Deterministic hashed bag of words (+ character trigrams): similar texts get similar vectors.

    For tests (of every layer) and ``--embedder fake``: the controller's API plumbing, index and
    store run for real, only the model is replaced; no model load.
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
