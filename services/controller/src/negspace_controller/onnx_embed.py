"""ONNX Runtime for a sentence-transformers pipeline (``--embed-backend onnx``).

Why: on a 2-core CPU the embedding is the ceiling of a guided run (torch encodes ~150-330 texts/s;
ONNX Runtime up to ~2x, see the controller README). Why this shape:

- Tokenisation stays sentence-transformers' own ``preprocess`` (truncation at ``max_seq_length``,
  lower-casing, the model's default prompt), batched as ``encode`` batches (longest first).
- The graph is a trace of sentence-transformers' own modules, the Transformer and what follows it
  (Pooling in any mode, Dense, Normalize), not a re-implementation of them: the vectors are the
  torch path's to float rounding (~1e-7). The whole pipeline is in the graph, so no torch op runs
  per batch: torch's thread pool waking next to ONNX Runtime's spinning one halved the throughput
  at batch 6 on 2 cores when pooling ran in torch.
- Pipelines with anything else (another first module, WeightedLayerPooling, LayerNorm, a Router,
  ...) raise :class:`OnnxUnsupported`; the embedder then uses torch and logs why (same vectors,
  only slower).
- Exported once per (weights, pipeline, prompt, torch / transformers / onnx versions) into
  ``$NEGSPACE_HOME/models/onnx/<model name>-<key>/model.onnx`` with ``prepare_once``: under a file
  lock (a second process waits, then reuses it), written aside and renamed into place (a kill
  mid-export leaves no half-written file).
- Every load here is checked against torch on a few probe texts (padded, one past
  ``max_seq_length``, one in unicode): a cached export that does not load or does not match is
  exported again; a fresh one that still fails raises :class:`OnnxUnsupported` (torch is used).
- Once it passes, and the model is a folder, the serving manifest is written beside the graph
  (``onnx_serve``), so the next start needs neither torch nor sentence-transformers.

    python -m negspace_controller.onnx_embed prepare [MODEL]   # `make setup` runs it for the bundled one
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from negspace_controller.embedding import resolve_model, sentence_embedding_dimension, token_lengths
from negspace_controller.onnx_serve import (
    CHECK_TEXTS,
    FEEDS,
    FORMAT_VERSION,
    KEY_PACKAGES,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MODEL_FILE,
    OUTPUT,
    TOKENIZER_FILE,
    VERIFY_ATOL,
    ManifestTokenizer,
    cut,
    encode_in_batches,
    make_session,
    package_versions,
    probe_texts,
    safe_name,
    source_key,
    unpadded_ids,
)
from negspace_controller.onnx_serve import default_onnx_dir as onnx_dir

log = logging.getLogger("negspace.controller")

# Modules after the Transformer that only read what it and preprocess produce (token_embeddings,
# attention_mask, prompt_length, sentence_embedding), so a trace of them is the same computation.
SUPPORTED_AFTER = ("Pooling", "Dense", "Normalize")
BOOKKEEPING = frozenset({"modality", "prompt_length"})  # preprocess keys that are no model input
TEXT_FORWARD = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


class OnnxUnsupported(Exception):
    """This model cannot use ONNX Runtime here; the message says why (the embedder uses torch)."""


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
    if "Pooling" not in names:
        return f"pipeline {names}: no Pooling, so no sentence embedding"
    tr = modules[0]
    if not hasattr(st, "preprocess"):
        return "this sentence-transformers version has no preprocess (needs >= 6)"
    config = getattr(tr, "modality_config", None)
    if config != TEXT_FORWARD:
        return f"the Transformer's modality_config is {config}, not text through forward -> last_hidden_state"
    if getattr(tr.auto_model.config, "output_hidden_states", False):
        return "the model config asks for all hidden states (output_hidden_states)"
    return None


def export_key(st, feeds: list[str], prompt_length: int | None) -> str:
    """What the exported graph depends on: every module's weights themselves (so a hub id, a folder
    and the bundled package all work; ~0.1 s for MiniLM), the pipeline and model config, the baked
    prompt length, the input names, and the versions of the code that traces and writes it."""
    import onnx
    import torch
    import transformers

    h = hashlib.sha256()
    for part in (FORMAT_VERSION, torch.__version__, transformers.__version__, onnx.__version__, repr(st),
                 st[0].auto_model.config.to_json_string(use_diff=False), ",".join(feeds), prompt_length):
        h.update(str(part).encode() + b"\0")
    for name, tensor in st.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def export_onnx(st, feeds: list[str], prompt_length: int | None, sample: dict, path: Path) -> None:
    """Trace ``st``'s modules (``feeds`` -> unit sentence embeddings) into ``path``, batch and token
    axes dynamic. ``sample`` must be padded: the trace keeps the attention-mask path only if it saw
    padding. ``prompt_length`` (the default prompt's, excluded by Pooling(include_prompt=False)) is
    a constant of the graph, as the prompt is of the model."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.steps = torch.nn.ModuleList(st._modules.values())

        def forward(self, *tensors):
            features = dict(zip(feeds, tensors, strict=True), modality="text")
            if prompt_length is not None:
                features["prompt_length"] = prompt_length
            for step in self.steps:
                features = step(features)
            return torch.nn.functional.normalize(features[OUTPUT], p=2, dim=1)

    axes = {name: {0: "batch", 1: "tokens"} for name in feeds} | {OUTPUT: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches on constant shapes
        torch.onnx.export(Pipeline().eval(), tuple(sample[k] for k in feeds), str(path), input_names=list(feeds),
                          output_names=[OUTPUT], dynamic_axes=axes, opset_version=17, dynamo=False)


class OnnxEncoder:
    """``encode(texts, batch_size)``: what ``SentenceTransformer.encode(normalize_embeddings=True)``
    returns, computed by ONNX Runtime (CPU)."""

    def __init__(self, st, name: str, cache_root: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401  (ImportError here, before any work, when it is missing)
        import torch

        reason = unsupported_reason(st)
        if reason:
            raise OnnxUnsupported(reason)
        self.st = st
        self.prompt = st.prompts.get(st.default_prompt_name) if st.default_prompt_name else None
        self.truncate_dim = st.truncate_dim
        self.threads = threads or torch.get_num_threads()
        self.probe_texts = probe_texts(st.max_seq_length or 512)
        probe = self.features(self.probe_texts)
        extra = sorted(set(probe) - set(FEEDS) - BOOKKEEPING)
        if extra or "input_ids" not in probe:
            raise OnnxUnsupported(f"preprocess produces {sorted(probe)}; the ONNX path feeds {list(FEEDS)} only")
        params = inspect.signature(st[0].auto_model.forward).parameters
        any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.feeds = [k for k in FEEDS if k in probe and (any_kw or k in params)]  # what ST would pass
        self.prompt_length = probe.get("prompt_length")
        key = export_key(st, self.feeds, self.prompt_length)
        self.path = (cache_root or onnx_dir()) / f"{safe_name(name)}-{key}" / MODEL_FILE
        with torch.inference_mode():
            emb = st(dict(probe))[OUTPUT]
            self.want = cut(torch.nn.functional.normalize(emb, p=2, dim=1).numpy(), self.truncate_dim)
        self.exported = False
        self.session = self._load_checked(probe, self.want)

    def features(self, texts: list[str]) -> dict:
        """sentence-transformers' own tokenisation (and default prompt), exactly as ``encode`` does it."""
        return self.st.preprocess(texts, prompt=self.prompt)

    def _run(self, session, features: dict) -> np.ndarray:
        if set(features) - BOOKKEEPING - set(FEEDS) or features.get("prompt_length") != self.prompt_length:
            raise RuntimeError(f"preprocess now produces {sorted(features)} (prompt length "
                               f"{features.get('prompt_length')}); the ONNX graph takes {self.feeds} "
                               f"(prompt length {self.prompt_length})")
        out = session.run([OUTPUT], {k: np.ascontiguousarray(features[k].numpy(), np.int64) for k in self.feeds})[0]
        return cut(out, self.truncate_dim)

    def _prepare(self, probe: dict, force: bool) -> bool:
        """The export in place (once); True when this call wrote it."""
        from negspace_models import prepare_once

        wrote = False

        def build(tmp: Path) -> dict:
            nonlocal wrote
            t0 = time.perf_counter()
            try:
                export_onnx(self.st, self.feeds, self.prompt_length, probe, tmp / MODEL_FILE)
            except Exception as exc:
                raise OnnxUnsupported(f"the ONNX export failed: {type(exc).__name__}: {exc}") from exc
            wrote = True
            seconds = time.perf_counter() - t0
            log.info("exported the embedder to ONNX in %.1f s: %s", seconds, self.path)
            import onnx
            import torch
            import transformers
            return {"format": FORMAT_VERSION, "export_s": round(seconds, 2), "feeds": self.feeds,
                    "prompt_length": self.prompt_length, "torch": torch.__version__,
                    "transformers": transformers.__version__, "onnx": onnx.__version__}

        prepare_once(self.path.parent, build, force=force)
        return wrote

    def _load_checked(self, probe: dict, want: np.ndarray):
        for force in (False, True):
            self.exported = self._prepare(probe, force)
            try:
                session = make_session(self.path, self.threads)
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
        """Unit vectors, batched as ``SentenceTransformer.encode`` batches (``encode_in_batches``)."""
        return encode_in_batches(texts, batch_size, lambda batch: self._run(self.session, self.features(batch)))


def tokenizer_spec(enc: OnnxEncoder) -> tuple[dict, str]:
    """(how ``ManifestTokenizer`` must call the tokenizer, the tokenizer's JSON) for ``enc``'s
    model; ValueError when it is no plain fast tokenizer."""
    tok = enc.st.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if not getattr(tok, "is_fast", False) or backend is None:
        raise ValueError(f"{type(tok).__name__} is not a fast tokenizer")
    if tok.pad_token is None:
        raise ValueError("the tokenizer has no padding token")
    data = json.loads(backend.to_str())
    data["truncation"] = data["padding"] = None  # set per call by ManifestTokenizer, as HF sets them
    max_length = tok.model_max_length if tok.model_max_length < 10**6 else None  # HF: "no limit"
    spec = {"feeds": list(enc.feeds), "prompt": enc.prompt, "max_length": max_length,
            "truncation_side": tok.truncation_side, "padding_side": tok.padding_side,
            "pad_id": tok.pad_token_id, "pad_token": tok.pad_token, "pad_type_id": tok.pad_token_type_id,
            "do_lower_case": bool(getattr(enc.st[0], "do_lower_case", False))}  # (in the normaliser already)
    return spec, json.dumps(data, ensure_ascii=False)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(enc: OnnxEncoder, source: Path, name: str) -> Path:
    """The serving manifest (``onnx_serve``) beside ``enc``'s graph for the model folder
    ``source``. Written again at every start through here (~50 ms): such a start means the one
    there did not serve. Only when the tokenizer rebuilt from it gives sentence-transformers' own
    features and lengths (else ValueError: later starts then load torch, as before)."""
    folder = enc.path.parent
    target = folder / MANIFEST_FILE
    spec, tok_json = tokenizer_spec(enc)
    rebuilt = ManifestTokenizer(spec, tok_json)
    for texts in (enc.probe_texts + list(CHECK_TEXTS), list(CHECK_TEXTS)):
        want = enc.features(texts)
        got = rebuilt.features(texts)
        if any(not np.array_equal(got[k], want[k].numpy()) for k in enc.feeds):
            raise ValueError("the tokenizer rebuilt with the tokenizers package tokenises differently")
        if rebuilt.lengths(texts) != token_lengths(enc.st.tokenizer, texts):
            raise ValueError("the tokenizer rebuilt with the tokenizers package counts tokens differently")
    probe = rebuilt.features(enc.probe_texts)
    modules = [{"type": type(m).__name__, "config": m.get_config_dict() if hasattr(m, "get_config_dict") else None}
               for m in enc.st._modules.values()]  # for the reader: pooling and normalisation run in the graph
    tok_bytes = tok_json.encode()
    manifest = {
        "manifest": MANIFEST_VERSION, "source_key": source_key(source), "name": name, "source": str(source),
        "key_packages": list(KEY_PACKAGES), "versions": package_versions(),
        "dimension": sentence_embedding_dimension(enc.st), "max_tokens": int(enc.st.max_seq_length),
        "truncate_dim": enc.truncate_dim, "tokenizer": spec, "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
        "model_size": enc.path.stat().st_size, "format": FORMAT_VERSION, "prompt_length": enc.prompt_length,
        "modules": modules,
        "probe": {"texts": enc.probe_texts, "ids": unpadded_ids(probe), "lengths": rebuilt.lengths(enc.probe_texts),
                  "vectors": enc.want.tolist()},
    }
    _write_atomic(folder / TOKENIZER_FILE, tok_bytes)
    _write_atomic(target, json.dumps(manifest, default=str).encode())  # last: it names the files above
    return target


def encoder_for(st, name: str, cache_root: Path | None = None, source: str | None = None) -> OnnxEncoder | None:
    """``st`` on ONNX Runtime, or None (it stays on torch) with the one log line that says why.
    With ``source``, a model folder, the serving manifest is written too (a failure to write it
    is logged and changes nothing for this start)."""
    try:
        enc = OnnxEncoder(st, name, cache_root)
    except ImportError as exc:
        log.warning("embedder %s: torch, not onnx: %s (pip install onnxruntime onnx)", name, exc)
        return None
    except OnnxUnsupported as exc:
        log.warning("embedder %s: torch, not onnx: %s", name, exc)
        return None
    if source and Path(source).is_dir():
        try:
            written = write_manifest(enc, Path(source), name)
            log.info("embedder %s: wrote the serving manifest %s (the next start needs no torch)", name, written)
        except Exception as exc:
            log.warning("embedder %s: no serving manifest (starts keep loading torch): %s: %s", name,
                        type(exc).__name__, exc)
    return enc


def main(argv: list[str] | None = None) -> int:
    """``prepare [MODEL]``: export (or check) MODEL's ONNX graph and write its serving manifest, so
    the controller's first start pays neither the export nor torch. Prints the file as its last line; a model that cannot use ONNX is reported
    (the controller would use torch for it) and exits 0."""
    p = argparse.ArgumentParser(prog="python -m negspace_controller.onnx_embed")
    p.add_argument("command", choices=["prepare"])
    p.add_argument("model", nargs="?", default="", help="embedder setting (default: the bundled MiniLM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from sentence_transformers import SentenceTransformer

    source, name = resolve_model(args.model)
    log.info("loading embedder %s", source)
    onnx = encoder_for(SentenceTransformer(source, device="cpu"), name, source=source)
    if onnx is None:
        print(f"{name}: uses torch (see above)")
        return 0
    print(onnx.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
