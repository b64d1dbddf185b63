"""ONNX Runtime for the Transformer module of a sentence-transformers model (``--embed-backend onnx``).

Why: on a 2-core CPU the embedding is the ceiling of a guided run (torch encodes ~150-166 texts/s;
ONNX Runtime about twice that, see the controller README). Why this shape:

- Only the transformer forward is replaced. Tokenisation stays sentence-transformers' own
  ``preprocess`` (truncation at ``max_seq_length``, lower-casing, the model's default prompt), and the
  modules after the Transformer (Pooling in any mode, Dense, Normalize) are sentence-transformers'
  own modules run on the ONNX output, in the same length-sorted batches as ``encode``. So the vectors
  are the torch path's to float rounding (~1e-7), and anything that path does, this one does.
- Pipelines with anything else (another first module, WeightedLayerPooling, LayerNorm, Router, ...)
  raise :class:`OnnxUnsupported`; the embedder then uses torch and logs why (same vectors, only slower).
- Exported once per (weights, config, torch / transformers / onnx versions) into
  ``$NEGSPACE_HOME/models/onnx/<model name>-<key>/model.onnx`` with ``prepare_once``: under a file
  lock (a second process waits, then reuses it), written aside and renamed into place (a kill
  mid-export leaves no half-written file).
- Every load is checked against torch on a few probe texts (padded, and one past ``max_seq_length``);
  a cached export that does not load or does not match is exported again, and one that still fails
  raises :class:`OnnxUnsupported` (torch is used).

    python -m negspace_controller.onnx_embed prepare [MODEL]   # `make setup` runs it for the bundled one
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import re
import time
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("negspace.controller")

# Modules after the Transformer that only read what it and preprocess produce (token_embeddings,
# attention_mask, prompt_length, sentence_embedding): run as they are on the ONNX output.
SUPPORTED_AFTER = ("Pooling", "Dense", "Normalize")
FEEDS = ("input_ids", "attention_mask", "token_type_ids")
BOOKKEEPING = frozenset({"modality", "prompt_length"})  # preprocess keys that are no model input
TEXT_FORWARD = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
VERIFY_ATOL = 1e-4  # on unit vectors; a faithful export differs by ~1e-7
# Bumped when the export changes, so older cached exports are not trusted.
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"


class OnnxUnsupported(Exception):
    """This model cannot use ONNX Runtime here; the message says why (the embedder uses torch)."""


def onnx_dir() -> Path:
    from negspace_models import models_dir

    return models_dir() / "onnx"


def unsupported_reason(st) -> str | None:
    """Why ``st``'s pipeline cannot run on the ONNX path, or None when it can."""
    modules = list(st._modules.values())
    names = [type(m).__name__ for m in modules]
    if not names or names[0] != "Transformer":
        return f"pipeline {names}: the first module is not a Transformer"
    other = [n for n in names[1:] if n not in SUPPORTED_AFTER]
    if other:
        return (f"pipeline {names}: {', '.join(other)} after the Transformer is not supported "
                f"(only {', '.join(SUPPORTED_AFTER)})")
    tr = modules[0]
    if not hasattr(st, "preprocess"):
        return "this sentence-transformers version has no preprocess (needs >= 6)"
    config = getattr(tr, "modality_config", None)
    if config != TEXT_FORWARD:
        return f"the Transformer's modality_config is {config}, not text through forward -> last_hidden_state"
    if getattr(tr.auto_model.config, "output_hidden_states", False):
        return "the model config asks for all hidden states (output_hidden_states)"
    return None


def export_key(model, feeds: list[str]) -> str:
    """What the exported graph depends on: the weights themselves (so a hub id, a folder and the
    bundled package all work; ~0.1 s for MiniLM), the config, the input names, and the versions of
    the code that traces and writes it."""
    import onnx
    import torch
    import transformers

    h = hashlib.sha256()
    for part in (FORMAT_VERSION, torch.__version__, transformers.__version__, onnx.__version__,
                 type(model).__name__, model.config.to_json_string(use_diff=False), ",".join(feeds)):
        h.update(str(part).encode() + b"\0")
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def export_onnx(model, feeds: list[str], sample: dict, path: Path) -> None:
    """Trace ``model``'s forward (``feeds`` -> last_hidden_state) into ``path``, batch and token
    axes dynamic. ``sample`` must be padded: the trace keeps the attention-mask path only if it saw
    padding."""
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(feeds, tensors, strict=True)), return_dict=True).last_hidden_state

    axes = {name: {0: "batch", 1: "tokens"} for name in [*feeds, "token_embeddings"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches on constant shapes
        torch.onnx.export(TokenEmbeddings().eval(), tuple(sample[k] for k in feeds), str(path),
                          input_names=list(feeds), output_names=["token_embeddings"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


class OnnxTransformer:
    """``encode(texts, batch_size)``: what ``SentenceTransformer.encode(normalize_embeddings=True)``
    returns, with the transformer forward on ONNX Runtime (CPU)."""

    def __init__(self, st, name: str, cache_root: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401  (ImportError here, before any work, when it is missing)
        import torch

        reason = unsupported_reason(st)
        if reason:
            raise OnnxUnsupported(reason)
        self.st = st
        self.after = list(st._modules.values())[1:]
        self.prompt = st.prompts.get(st.default_prompt_name) if st.default_prompt_name else None
        self.truncate_dim = st.truncate_dim
        self.threads = threads or torch.get_num_threads()
        model = st[0].auto_model
        tokens = st.max_seq_length or 512
        probe = self.features(["", "A probe.", "A longer probe text, with a few more tokens in it than that.",
                               "word " * (tokens + 8)])
        extra = sorted(set(probe) - set(FEEDS) - BOOKKEEPING)
        if extra or "input_ids" not in probe:
            raise OnnxUnsupported(f"preprocess produces {sorted(probe)}; the ONNX path feeds {list(FEEDS)} only")
        params = inspect.signature(model.forward).parameters
        any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.feeds = [k for k in FEEDS if k in probe and (any_kw or k in params)]  # what ST would pass
        self.path = (cache_root or onnx_dir()) / f"{_safe(name)}-{export_key(model, self.feeds)}" / MODEL_FILE
        with torch.inference_mode():
            want = torch.nn.functional.normalize(self._pool(st[0](dict(probe))), p=2, dim=1).numpy()
        self.exported = False
        self.session = self._load_checked(model, probe, want)

    def features(self, texts: list[str]) -> dict:
        """sentence-transformers' own tokenisation (and default prompt), exactly as ``encode`` does it."""
        return self.st.preprocess(texts, prompt=self.prompt)

    def _pool(self, features: dict):
        for module in self.after:
            features = module(features)
        emb = features["sentence_embedding"]
        return emb[..., :self.truncate_dim] if self.truncate_dim else emb

    def _run(self, session, features: dict) -> np.ndarray:
        import torch

        if set(features) - BOOKKEEPING - set(FEEDS):
            raise RuntimeError(f"preprocess now produces {sorted(features)}; the ONNX graph takes {self.feeds}")
        out = session.run(["token_embeddings"],
                          {k: np.ascontiguousarray(features[k].numpy(), np.int64) for k in self.feeds})[0]
        features = dict(features)
        features["token_embeddings"] = torch.from_numpy(out)
        with torch.inference_mode():
            return torch.nn.functional.normalize(self._pool(features), p=2, dim=1).numpy()

    def _session(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: the optimiser's notes are no operator's concern
        return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])

    def _prepare(self, model, probe: dict, force: bool) -> bool:
        """The export in place (once); True when this call wrote it."""
        from negspace_models import prepare_once

        wrote = False

        def build(tmp: Path) -> dict:
            nonlocal wrote
            t0 = time.perf_counter()
            try:
                export_onnx(model, self.feeds, probe, tmp / MODEL_FILE)
            except Exception as exc:
                raise OnnxUnsupported(f"the ONNX export failed: {type(exc).__name__}: {exc}") from exc
            wrote = True
            seconds = time.perf_counter() - t0
            log.info("exported the embedder's transformer to ONNX in %.1f s: %s", seconds, self.path)
            import onnx
            import torch
            import transformers
            return {"format": FORMAT_VERSION, "export_s": round(seconds, 2), "feeds": self.feeds,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "onnx": onnx.__version__}

        prepare_once(self.path.parent, build, force=force)
        return wrote

    def _load_checked(self, model, probe: dict, want: np.ndarray):
        for force in (False, True):
            self.exported = self._prepare(model, probe, force)
            try:
                session = self._session()
                diff = float(np.abs(self._run(session, probe) - want).max())
                problem = None if diff <= VERIFY_ATOL else f"differs from torch by {diff:.2g} on the probe texts"
            except Exception as exc:
                problem = f"does not load: {type(exc).__name__}: {exc}"
            if problem is None:
                return session
            if self.exported:
                raise OnnxUnsupported(f"the fresh ONNX export {self.path} {problem}")
            log.warning("the cached ONNX export %s %s: exporting it again", self.path, problem)
        raise AssertionError("unreachable")

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit vectors, batched as ``SentenceTransformer.encode`` batches (longest texts first, by
        characters), so each batch is padded as the torch path pads it."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            vecs = self._run(self.session, self.features([texts[i] for i in idx]))
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), np.float32)
            out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), np.float32)


def main(argv: list[str] | None = None) -> int:
    """``prepare [MODEL]``: export (or check) MODEL's ONNX graph, so the controller's first start
    does not pay it. Prints the file as its last line; a model that cannot use ONNX is reported
    (the controller would use torch for it) and exits 0."""
    p = argparse.ArgumentParser(prog="python -m negspace_controller.onnx_embed")
    p.add_argument("command", choices=["prepare"])
    p.add_argument("model", nargs="?", default="", help="embedder setting (default: the bundled MiniLM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from negspace_controller.embedder import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder(args.model, backend="onnx", device="cpu")
    if emb.backend != "onnx":
        print(f"{emb.name}: uses torch (see above)")
        return 0
    print(emb.onnx.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
