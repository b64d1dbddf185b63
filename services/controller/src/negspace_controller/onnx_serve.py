"""The ONNX embedder started without torch: a serving manifest beside ``model.onnx``, read with
the ``tokenizers`` package and ONNX Runtime only.

Why: importing torch (through sentence-transformers) was 6.7 s of a 14.3 s controller restart, and
the ONNX path needs torch only to export the graph and to check it. So the start that exports
(``onnx_embed``, which has torch loaded anyway) also writes what serving needs:

- ``tokenizer.json``: the fast tokenizer exactly as sentence-transformers configured it (its
  normaliser includes the lower-casing ``do_lower_case`` adds), saved from the loaded tokenizer.
- ``serving.json``: truncation length and sides, padding, the default prompt, ``truncate_dim``, the
  graph's feeds, the embedder's name / dimension / ``max_seq_length``, the pipeline (pooling and
  normalisation are inside the graph, a trace of sentence-transformers' own modules, so nothing is
  pooled here), probe texts with their token ids and torch's vectors for them, and
  ``source_key``: a hash of the model folder's files (config and tokenizer files by content, the
  large weight files by size and mtime) and of the installed versions of the packages that
  export, tokenise and run it (read with ``importlib.metadata``, nothing imported).

It is written only after the tokenizer rebuilt from it gave sentence-transformers' own features on
a set of texts (unicode, whitespace, special-token strings, one past ``max_seq_length``).

At a start with ``--embed-backend onnx`` on CPU, ``manifest_embedder`` finds the export whose
manifest has this folder's ``source_key``, tokenises the probe texts (their ids must equal the
manifest's) and runs them (vectors within ``VERIFY_ATOL`` of torch's). No manifest, a hub id (no
folder to key), a device other than CPU, or any mismatch: it returns None and logs one line why;
the caller then starts through sentence-transformers (``st_embed``), which checks the export
against torch and writes the manifest for the next start.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from negspace_controller.embedding import Embedder, resolve_model

log = logging.getLogger("negspace.controller")

FEEDS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "serving.json"
TOKENIZER_FILE = "tokenizer.json"
VERIFY_ATOL = 1e-4  # on unit vectors; a faithful export differs by ~1e-7
# Bumped when the export changes, so older cached exports are not trusted.
FORMAT_VERSION = 1
# Bumped when the manifest's content or its meaning changes, so older manifests are not read.
MANIFEST_VERSION = 1
# What the export and the serving depend on, read from the installed metadata (nothing imported).
KEY_PACKAGES = ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "tokenizers")
HASHED_BELOW = 1 << 20  # files smaller than this are keyed by content, larger ones by size and mtime
# Texts the tokenizer rebuilt from the manifest must tokenise as sentence-transformers does before
# the manifest is written (the probe texts are checked too).
CHECK_TEXTS = ("   ", "A", "HELLO [SEP] world [MASK] [PAD]", "\t\nx  y\u00a0z\u200b", "Ünïcödé ÅÄÖ ß ﬁ ½ ①",
               "Write a math problem about apples.", "日本語のテキスト、句読点。", "e\u0301 vs \u00e9")


def probe_texts(max_tokens: int) -> list[str]:
    """Checked at every start (padded together; one past ``max_seq_length``, one in unicode)."""
    return ["", "A probe.", "A longer probe text, with a few more tokens in it than that.",
            "word " * (max_tokens + 8), "Héllo WÖRLD — 你好, мир 🚀 naïve café"]


def default_onnx_dir() -> Path:
    from negspace_models import models_dir

    return models_dir() / "onnx"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def default_threads() -> int:
    """torch's default intra-op thread count, computed without torch: OMP_NUM_THREADS, else
    MKL_NUM_THREADS, else one per CPU this process may run on."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            if int(os.environ.get(var, "0")) > 0:
                return int(os.environ[var])
        except ValueError:
            pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_key(folder: Path) -> str:
    """What a manifest is valid for, computed without torch (~ms for MiniLM): every file of the
    model folder (dot-files aside) by relative path and content, or by size and mtime when it is
    1 MiB or more (the weights), plus the versions of ``KEY_PACKAGES``."""
    h = hashlib.sha256(f"{MANIFEST_VERSION}\0{FORMAT_VERSION}\0".encode())
    h.update(json.dumps(package_versions(), sort_keys=True).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        st = path.stat()
        h.update(f"\0{rel.as_posix()}\0{st.st_size}\0".encode())
        if st.st_size < HASHED_BELOW:
            h.update(path.read_bytes())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def make_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # No spin-waiting between runs: the controller's event loop, its index work and (on one
    # machine) the other services need those cores. bench-scale 64 x 60: 112.8 and 120.5
    # instructions/s without spinning against 96.5 and 96.3 with ONNX Runtime's default.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: the optimiser's notes are no operator's concern
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cut(vecs: np.ndarray, truncate_dim: int | None) -> np.ndarray:
    """sentence-transformers' ``truncate_dim``, renormalised (the graph's output is a unit vector)."""
    if not truncate_dim:
        return vecs
    vecs = vecs[:, :truncate_dim]
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def encode_in_batches(texts: list[str], batch_size: int, run: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``run`` over batches formed as ``SentenceTransformer.encode`` forms them (longest texts
    first, by characters), so each batch is padded as the torch path pads it; rows in input order."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        vecs = run([texts[i] for i in idx])
        if out is None:
            out = np.empty((len(texts), vecs.shape[1]), np.float32)
        out[idx] = vecs
    return out if out is not None else np.zeros((0, 0), np.float32)


class ManifestTokenizer:
    """sentence-transformers' text preprocessing for a plain fast tokenizer, with ``tokenizers``:
    the default prompt prepended, truncation at ``max_length`` ("longest_first"), padding to the
    longest text of the batch; and the untruncated lengths the ``truncated`` flags come from."""

    def __init__(self, spec: dict, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.prompt = spec.get("prompt") or ""
        self.feeds = list(spec["feeds"])
        self.batch = Tokenizer.from_str(tokenizer_json)
        if spec.get("max_length"):
            self.batch.enable_truncation(int(spec["max_length"]), strategy="longest_first",
                                         direction=spec["truncation_side"])
        else:
            self.batch.no_truncation()
        self.batch.enable_padding(direction=spec["padding_side"], pad_id=int(spec["pad_id"]),
                                  pad_type_id=int(spec["pad_type_id"]), pad_token=spec["pad_token"])
        self.plain = Tokenizer.from_str(tokenizer_json)
        self.plain.no_truncation()
        self.plain.no_padding()

    def features(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.batch.encode_batch([self.prompt + t for t in texts], add_special_tokens=True)
        cols = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        return {k: np.asarray(cols[k], np.int64).reshape(len(texts), -1) for k in self.feeds}

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text with special tokens, untruncated, without the prompt (as ``st_embed``
        counts them for the ``truncated`` flags)."""
        return [len(e.ids) for e in self.plain.encode_batch(list(texts), add_special_tokens=True)]


def unpadded_ids(features: dict[str, np.ndarray]) -> list[list[int]]:
    mask = features["attention_mask"] if "attention_mask" in features else np.ones_like(features["input_ids"])
    return [[int(i) for i, m in zip(row, mrow, strict=True) if m] for row, mrow in
            zip(features["input_ids"], mask, strict=True)]


class ManifestEncoder:
    """``encode(texts, batch_size)`` from a manifest: the vectors of ``onnx_embed.OnnxEncoder``."""

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None) -> None:
        self.path = folder / MODEL_FILE
        self.manifest = manifest
        tok_file = folder / TOKENIZER_FILE
        tok_json = tok_file.read_bytes()
        if hashlib.sha256(tok_json).hexdigest() != manifest["tokenizer_sha256"]:
            raise ValueError(f"{tok_file} is not the file the manifest was written with")
        size = self.path.stat().st_size
        if size != manifest["model_size"]:
            raise ValueError(f"{self.path} has {size} bytes, the manifest says {manifest['model_size']}")
        self.tokenizer = ManifestTokenizer(manifest["tokenizer"], tok_json.decode())
        self.truncate_dim = manifest.get("truncate_dim")
        self.threads = threads or default_threads()
        probe = manifest["probe"]
        features = self.tokenizer.features(probe["texts"])
        if unpadded_ids(features) != probe["ids"] or self.tokenizer.lengths(probe["texts"]) != probe["lengths"]:
            raise ValueError("the probe texts' token ids differ from the manifest's")
        self.session = make_session(self.path, self.threads)
        diff = float(np.abs(self._run(features) - np.asarray(probe["vectors"], np.float32)).max())
        if not diff <= VERIFY_ATOL:
            raise ValueError(f"the probe vectors differ from torch's by {diff:.2g}")

    def _run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return cut(self.session.run([OUTPUT], features)[0], self.truncate_dim)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return encode_in_batches(texts, batch_size, lambda batch: self._run(self.tokenizer.features(batch)))


class ManifestEmbedder(Embedder):
    """The controller's ONNX embedder without torch: the same name, dimension, vectors and
    ``truncated`` flags as ``st_embed.SentenceTransformerEmbedder(backend="onnx")``."""

    backend = "onnx"

    def __init__(self, encoder: ManifestEncoder, *, batch_size: int = 64, **kw) -> None:
        super().__init__(**kw)
        self.onnx = encoder
        self.batch_size = batch_size
        m = encoder.manifest
        self.name, self.dimension, self.max_tokens = m["name"], int(m["dimension"]), int(m["max_tokens"])

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        lengths = self.onnx.tokenizer.lengths(texts)
        return self.onnx.encode(texts, self.batch_size), [n > self.max_tokens for n in lengths]


def find_manifest(root: Path, name: str, key: str) -> tuple[Path, dict] | None:
    """The newest export folder of ``name`` under ``root`` whose manifest has ``key``."""
    found = []
    for folder in root.glob(f"{safe_name(name)}-*"):
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (manifest.get("manifest"), manifest.get("source_key"), manifest.get("name")) == (MANIFEST_VERSION, key, name):
            found.append((folder.stat().st_mtime_ns, folder, manifest))
    if not found:
        return None
    _, folder, manifest = max(found, key=lambda f: f[0])
    return folder, manifest


def accelerator() -> str | None:
    """An accelerator sentence-transformers' automatic device would pick (seen without torch)."""
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        return "Apple silicon (mps)"
    for dev in ("/dev/nvidiactl", "/dev/kfd"):
        if os.path.exists(dev):
            return f"a GPU ({dev})"
    return None


def manifest_embedder(setting: str, *, device: str | None = None, onnx_dir: Path | None = None,
                      batch_size: int = 64, threads: int | None = None, **kw) -> Embedder | None:
    """The embedder started from its manifest, or None (start through sentence-transformers); one
    log line either way (a warning when a manifest exists and does not serve)."""
    source, name = resolve_model(setting)
    why, level = _why_not(source, device), logging.INFO
    found = None
    if why is None:
        root = onnx_dir or default_onnx_dir()
        found = find_manifest(root, name, source_key(Path(source)))
        if found is None:
            why = f"no serving manifest under {root} for this model folder and these package versions yet"
    if found is not None:
        where, manifest = found
        try:
            emb = ManifestEmbedder(ManifestEncoder(where, manifest, threads), batch_size=batch_size, **kw)
            log.info("embedder %s: ONNX Runtime (%d threads) from its serving manifest, without torch: %s",
                     name, emb.onnx.threads, emb.onnx.path)
            return emb
        except Exception as exc:
            why, level = f"the manifest in {where} does not serve: {type(exc).__name__}: {exc}", logging.WARNING
    log.log(level, "embedder %s: starting through sentence-transformers (torch): %s", name, why)
    return None


def _why_not(source: str, device: str | None) -> str | None:
    if not Path(source).is_dir():
        return f"{source} is a hub id (a manifest is keyed by a model folder's files)"
    if device not in (None, "cpu"):
        return f"device {device} (ONNX Runtime is used on CPU only)"
    if device is None and (acc := accelerator()):
        return f"{acc} is present and --device is unset (sentence-transformers picks the device)"
    return None
