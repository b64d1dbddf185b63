"""The ONNX Runtime backend of the real embedder: the torch path's vectors and truncation flags, an
export made once and reused, safe under a concurrent second constructor, re-made when the cached
file is corrupt or wrong, and torch (one log line) for pipelines it does not support."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_controller import onnx_embed, onnx_serve
from negspace_controller.embedder import build_embedder
from negspace_controller.embedding import bundled_model_path
from negspace_controller.onnx_embed import OnnxEncoder, OnnxUnsupported, unsupported_reason
from negspace_controller.onnx_serve import ManifestEmbedder, manifest_embedder, source_key
from negspace_controller.settings import ControllerSettings
from negspace_controller.st_embed import SentenceTransformerEmbedder

TEXTS = ["", "   ", "héllo wörld — 你好, мир 🚀 naïve café", "Write a math problem about apples.",
         "word " * 254, "word " * 255, "word " * 400, "A", "Tell a story about a lost dog on a rainy day."] \
    + [f"Ask question {i} about " + "prime numbers and the moon " * (i % 7) for i in range(14)]


# ---- which pipelines qualify (no model load) ----

def fake_st(*names: str, config=onnx_embed.TEXT_FORWARD, hidden_states=False):
    mods = [type(n, (), {})() for n in names]
    if names and names[0] == "Transformer":
        mods[0].modality_config = config
        mods[0].auto_model = SimpleNamespace(config=SimpleNamespace(output_hidden_states=hidden_states))
    return SimpleNamespace(_modules={str(i): m for i, m in enumerate(mods)}, preprocess=lambda *a, **k: {})


def test_supported_pipelines_and_why_others_are_not():
    assert unsupported_reason(fake_st("Transformer", "Pooling", "Normalize")) is None
    assert unsupported_reason(fake_st("Transformer", "Pooling", "Dense", "Normalize")) is None
    assert "no Pooling" in unsupported_reason(fake_st("Transformer", "Normalize"))
    assert "first module" in unsupported_reason(fake_st("StaticEmbedding", "Pooling"))
    assert "WeightedLayerPooling" in unsupported_reason(fake_st("Transformer", "WeightedLayerPooling", "Pooling"))
    assert "LayerNorm" in unsupported_reason(fake_st("Transformer", "Pooling", "LayerNorm"))
    assert "modality_config" in unsupported_reason(
        fake_st("Transformer", "Pooling", config={"message": {"method": "forward", "method_output_name": None}}))
    assert "hidden states" in unsupported_reason(fake_st("Transformer", "Pooling", hidden_states=True))


def test_backend_setting(monkeypatch):
    assert ControllerSettings().embed_backend == "onnx"
    monkeypatch.setenv("CONTROLLER_EMBED_BACKEND", "torch")
    assert ControllerSettings().embed_backend == "torch"
    monkeypatch.setenv("CONTROLLER_EMBED_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="embed_backend"):
        ControllerSettings()


def test_manifest_setting(monkeypatch):
    assert ControllerSettings().embed_manifest is True
    monkeypatch.setenv("CONTROLLER_EMBED_MANIFEST", "false")
    assert ControllerSettings().embed_manifest is False


def test_manifest_start_declines_hub_ids_and_other_devices(tmp_path, caplog):
    """Without a model folder or on another device there is nothing to start from: one info line
    each, nothing loaded, nothing written."""
    with caplog.at_level(logging.INFO, "negspace.controller"):
        assert manifest_embedder("sentence-transformers/all-MiniLM-L6-v2", onnx_dir=tmp_path) is None
        assert manifest_embedder("", device="cuda", onnx_dir=tmp_path) is None
        assert manifest_embedder("", device="cpu", onnx_dir=tmp_path) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("starting through sentence-transformers" in line for line in lines), lines
    assert "hub id" in lines[0] and "device cuda" in lines[1] and "no serving manifest" in lines[2]
    assert all(r.levelno == logging.INFO for r in caplog.records) and list(tmp_path.iterdir()) == []


def test_source_key_follows_the_folder_files_and_the_versions(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    weights = folder / "model.safetensors"
    weights.write_bytes(b"w" * (onnx_serve.HASHED_BELOW + 1))
    key = source_key(folder)
    assert key == source_key(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("hub bookkeeping")
    assert source_key(folder) == key
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": false}')
    changed = source_key(folder)
    assert changed != key
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert source_key(folder) != changed
    changed = source_key(folder)
    monkeypatch.setattr(onnx_serve, "package_versions", lambda: {"onnxruntime": "0.0"})
    assert source_key(folder) != changed


async def test_health_says_which_backend_runs_the_embedder(run_app):
    async with run_app(ControllerSettings(embedder="fake", qdrant_path=":memory:")) as (_, _client, raw):
        assert (await raw.get("/health")).json()["info"]["embed_backend"] == "none"


# ---- the real bundled MiniLM ----

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def torch_emb():
    return SentenceTransformerEmbedder("", batch_size=16)


@pytest.fixture(scope="module")
def onnx_emb(home):
    return SentenceTransformerEmbedder("", batch_size=16, backend="onnx", onnx_dir=home / "models" / "onnx")


@pytest.fixture
def exports(monkeypatch):
    """How many times the real export ran (it still runs)."""
    calls = []
    real = onnx_embed.export_onnx

    def counting(*args, **kw):
        calls.append(time.monotonic())
        return real(*args, **kw)

    monkeypatch.setattr(onnx_embed, "export_onnx", counting)
    return calls


def encode_both(fast, slow, texts, batch_size, monkeypatch):
    """(vectors, flags) of ``fast`` then of ``slow``, both at ``batch_size``; 384-dim float32 rows."""
    for emb in (fast, slow):
        monkeypatch.setattr(emb, "batch_size", batch_size)
    (got, got_trunc), (want, want_trunc) = fast.encode(texts), slow.encode(texts)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    return got, got_trunc, want, want_trunc


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_onnx_vectors_and_truncation_equal_torch(torch_emb, onnx_emb, batch_size, monkeypatch):
    assert (onnx_emb.backend, torch_emb.backend) == ("onnx", "torch")
    assert (onnx_emb.name, onnx_emb.dimension, onnx_emb.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    lengths = [len(ids) for ids in torch_emb.model.tokenizer(TEXTS, truncation=False)["input_ids"]]
    assert (lengths[4], lengths[5]) == (256, 257)  # the boundary: 256 tokens fit, 257 do not
    got, got_trunc, want, want_trunc = encode_both(onnx_emb, torch_emb, TEXTS, batch_size, monkeypatch)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got_trunc == want_trunc and [i for i, t in enumerate(got_trunc) if t] == [5, 6]
    single = np.stack([onnx_emb.encode([t])[0][0] for t in TEXTS[:6]])  # batch composition does not matter
    np.testing.assert_allclose(single, got[:6], atol=1e-5)
    # the query template is applied before either backend sees the text
    for emb in (torch_emb, onnx_emb):
        monkeypatch.setattr(emb, "query_instruction", "Find similar instructions")
    np.testing.assert_allclose(onnx_emb.encode(TEXTS[2:4], query=True)[0],
                               torch_emb.encode(TEXTS[2:4], query=True)[0], atol=1e-5)
    assert not np.allclose(onnx_emb.encode(TEXTS[3:4], query=True)[0], got[3:4], atol=1e-3)


@pytest.mark.slow
def test_second_construction_reuses_the_export(onnx_emb, home, exports, caplog):
    path = onnx_emb.onnx.path
    assert path.parent.parent == home / "models" / "onnx" and path.name == "model.onnx"
    assert path.parent.name.startswith("all-MiniLM-L6-v2-") and onnx_emb.onnx.exported
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, "negspace.controller"):
        again = SentenceTransformerEmbedder("", backend="onnx", onnx_dir=home / "models" / "onnx")
    assert again.backend == "onnx" and not again.onnx.exported and exports == []
    assert again.onnx.path == path and path.stat().st_mtime_ns == before
    # its threads sleep between runs instead of spinning (they would take the other services' cores)
    options = again.onnx.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert any("cached export" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in path.parent.parent.iterdir()) == sorted([path.parent.name, f".{path.parent.name}.lock"])


@pytest.mark.slow
def test_concurrent_second_constructor_waits_and_reuses(torch_emb, onnx_emb, tmp_path, exports, monkeypatch):
    """A exports (and holds the lock 3 s after writing, the file still aside); B starts meanwhile,
    waits, then loads A's file without exporting. Nothing is visible at the final path before A
    renames it there."""
    import negspace_models

    real_export, real_prepare = onnx_embed.export_onnx, negspace_models.prepare_once
    writing, entered, seen = threading.Event(), {}, {}

    def slow_export(*args):
        real_export(*args)
        seen["final_exists_while_writing"] = any(p.name.startswith("all-MiniLM") for p in tmp_path.iterdir())
        writing.set()
        time.sleep(3)

    def recording_prepare(target, build, *, force=False):
        entered[threading.current_thread().name] = time.monotonic()
        out = real_prepare(target, build, force=force)
        entered[threading.current_thread().name + " done"] = time.monotonic()
        return out

    monkeypatch.setattr(onnx_embed, "export_onnx", slow_export)
    monkeypatch.setattr(negspace_models, "prepare_once", recording_prepare)
    results = {}

    def construct(st, label):
        results[label] = OnnxEncoder(st, "all-MiniLM-L6-v2", tmp_path)

    a = threading.Thread(target=construct, args=(torch_emb.model, "A"), name="A")
    a.start()
    assert writing.wait(120)
    b = threading.Thread(target=construct, args=(onnx_emb.model, "B"), name="B")
    b.start()
    a.join(120)
    b.join(120)
    assert set(results) == {"A", "B"}, "a constructor failed (see the captured log)"
    assert results["A"].exported and not results["B"].exported
    assert entered["B"] < entered["A done"], "B did not overlap A's export: the test proved nothing"
    assert seen["final_exists_while_writing"] is False
    assert results["A"].path == results["B"].path and results["B"].path.is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    np.testing.assert_allclose(results["B"].encode(TEXTS, 8), results["A"].encode(TEXTS, 8), atol=1e-6)


@pytest.mark.slow
def test_failed_export_leaves_nothing_and_falls_back_to_torch(torch_emb, tmp_path, monkeypatch, caplog):
    """An export that dies half-way (here: half a file written, then an error) publishes nothing;
    the embedder uses torch with one warning; the next start exports normally."""
    def broken(*args):
        path = args[-1]
        path.write_bytes(b"\x08\x07" * 1000)
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_embed, "export_onnx", broken)
    with pytest.raises(OnnxUnsupported, match="export failed: RuntimeError: disk full"):
        OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path)
    with caplog.at_level(logging.INFO, "negspace.controller"):
        emb = SentenceTransformerEmbedder("", backend="onnx", onnx_dir=tmp_path)
    assert emb.backend == "torch" and emb.onnx is None
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "torch, not onnx" in warned[0] and "disk full" in warned[0], warned
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    np.testing.assert_allclose(emb.encode(TEXTS[:8])[0], torch_emb.encode(TEXTS[:8])[0], atol=1e-6)
    monkeypatch.undo()
    assert OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path).exported


@pytest.mark.slow
def test_truncated_cached_file_is_exported_again(torch_emb, onnx_emb, tmp_path, exports, caplog):
    first = OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path)
    size = first.path.stat().st_size
    with open(first.path, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, "negspace.controller"):
        again = OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path)
    assert again.exported and len(exports) == 2 and again.path.stat().st_size == size
    assert any("does not load" in r.getMessage() and "exporting it again" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(again.encode(TEXTS, 16), onnx_emb.onnx.encode(TEXTS, 16), atol=1e-6)


@pytest.mark.slow
def test_cached_file_that_loads_but_disagrees_is_exported_again(torch_emb, tmp_path, exports, caplog):
    import onnx
    from onnx import numpy_helper

    first = OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path)
    graph = onnx.load(str(first.path))
    big = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
    onnx.save(graph, str(first.path))
    with caplog.at_level(logging.WARNING, "negspace.controller"):
        again = OnnxEncoder(torch_emb.model, "all-MiniLM-L6-v2", tmp_path)
    assert again.exported and len(exports) == 2
    assert any("differs from torch" in r.getMessage() for r in caplog.records)


def save_pipeline(path, modules_after, max_seq_length=32, prompts=None, default_prompt=None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    tr = models.Transformer(str(bundled_model_path()), max_seq_length=max_seq_length)
    st = SentenceTransformer(modules=[tr, *modules_after(tr.get_embedding_dimension())], device="cpu")
    if prompts:
        st.prompts, st.default_prompt_name = prompts, default_prompt
    st.save(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["cls+dense", "mean-without-prompt"])
def test_other_pooling_dense_and_prompts_are_faithful(pipeline, tmp_path):
    """CLS pooling + a Dense layer, and mean pooling that excludes the model's default prompt: the
    graph is a trace of sentence-transformers' own modules, so they match too."""
    from sentence_transformers.sentence_transformer import modules as models

    if pipeline == "cls+dense":
        folder = save_pipeline(tmp_path / "cls-dense", lambda d: [models.Pooling(d, "cls"), models.Dense(d, 24),
                                                                  models.Normalize()])
    else:
        folder = save_pipeline(tmp_path / "mean-prompt", lambda d: [models.Pooling(d, "mean", include_prompt=False)],
                               prompts={"doc": "passage: "}, default_prompt="doc")
    slow = SentenceTransformerEmbedder(str(folder), batch_size=7)
    fast = SentenceTransformerEmbedder(str(folder), batch_size=7, backend="onnx", onnx_dir=tmp_path / "onnx")
    assert fast.backend == "onnx" and fast.name == slow.name and fast.dimension == slow.dimension
    assert fast.max_tokens == 32
    got, got_trunc = fast.encode(TEXTS)
    want, want_trunc = slow.encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got_trunc == want_trunc and sum(got_trunc) > 3


@pytest.mark.slow
def test_unsupported_pipeline_uses_torch_with_one_log_line(tmp_path, caplog, exports):
    from sentence_transformers.sentence_transformer import modules as models

    folder = save_pipeline(tmp_path / "layernorm", lambda d: [models.Pooling(d, "mean"), models.LayerNorm(d)])
    with caplog.at_level(logging.INFO, "negspace.controller"):
        emb = SentenceTransformerEmbedder(str(folder), backend="onnx", onnx_dir=tmp_path / "onnx")
    assert emb.backend == "torch" and emb.onnx is None and exports == []
    lines = [r.getMessage() for r in caplog.records if "onnx" in r.getMessage().lower()]
    assert len(lines) == 1 and "LayerNorm" in lines[0] and "torch, not onnx" in lines[0], lines
    assert not (tmp_path / "onnx").exists()
    want = emb.model.encode(TEXTS[:6], normalize_embeddings=True)
    np.testing.assert_allclose(emb.encode(TEXTS[:6])[0], want, atol=1e-6)


@pytest.mark.slow
async def test_controller_uses_onnx_by_default_and_setup_prepare_reuses_it(onnx_emb, home, monkeypatch,
                                                                           run_app, capsys, exports):
    """The service's default, with $NEGSPACE_HOME/models/onnx as the cache; and `python -m
    negspace_controller.onnx_embed prepare` (what `make setup` runs) finds the same export."""
    monkeypatch.setenv("NEGSPACE_HOME", str(home))
    async with run_app(ControllerSettings(qdrant_path=":memory:")) as (_, client, raw):
        assert (await raw.get("/health")).json()["info"]["embed_backend"] == "onnx"
        await client.collections.create("c")
        texts = [t for t in TEXTS if t.strip()]  # the API refuses empty texts
        up = await client.collections.upsert("c", [PointIn(id=i, text=t) for i, t in enumerate(texts)])
        assert up.truncated == onnx_emb.encode(texts)[1] and sum(up.truncated) == 2
    assert onnx_embed.main(["prepare"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(onnx_emb.onnx.path)
    assert exports == []


# ---- the serving manifest: the ONNX start without torch ----

MORE_TEXTS = ["HELLO [SEP] World [MASK]", "\t\n tabs  and\u00a0nbsp\u200b", "e\u0301 vs \u00e9", "日本語のテキスト。" * 60,
              "Ünïcödé ß ﬁ ½ ①", "x" * 3000, "xy " * 400, "Mixed CASE Words, Numbers 12345 and punctuation?!"]


@pytest.fixture(scope="module")
def manifest_emb(onnx_emb, home):
    return manifest_embedder("", device="cpu", onnx_dir=home / "models" / "onnx", batch_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_manifest_embedder_equals_the_torch_tokenised_onnx_encoder(manifest_emb, onnx_emb, batch_size, monkeypatch):
    """The start without torch serves the vectors and flags of the sentence-transformers-tokenised
    ONNX path (the collections stored so far depend on them): empty, unicode, special-token
    strings, texts past max_seq_length, batches of mixed lengths."""
    assert isinstance(manifest_emb, ManifestEmbedder) and manifest_emb.onnx.path == onnx_emb.onnx.path
    assert (manifest_emb.name, manifest_emb.dimension, manifest_emb.max_tokens, manifest_emb.backend) == \
        (onnx_emb.name, onnx_emb.dimension, onnx_emb.max_tokens, "onnx")
    texts = TEXTS + MORE_TEXTS
    got, got_trunc, want, want_trunc = encode_both(manifest_emb, onnx_emb, texts, batch_size, monkeypatch)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got_trunc == want_trunc and sum(got_trunc) == 4  # 255 and 400 words, 60 x Japanese, 400 x "xy"
    features = manifest_emb.onnx.tokenizer.features(texts)  # one padded batch, as preprocess pads it
    st_features = onnx_emb.model.preprocess(texts)
    assert sorted(features) == ["attention_mask", "input_ids", "token_type_ids"]
    for name, ids in features.items():
        np.testing.assert_array_equal(ids, st_features[name].numpy())
    for emb in (manifest_emb, onnx_emb):
        monkeypatch.setattr(emb, "query_instruction", "Find similar instructions")
    np.testing.assert_allclose(manifest_emb.encode(texts[2:5], query=True)[0],
                               onnx_emb.encode(texts[2:5], query=True)[0], atol=1e-6)


START_WITHOUT_TORCH = """
import asyncio, json, logging, sys
logging.basicConfig(level=logging.INFO)
from negspace_controller.app import create_app
from negspace_controller.settings import ControllerSettings
from negspace_servekit.testing import asgi_client, lifespan

async def main():
    app = create_app(ControllerSettings(qdrant_path=":memory:"))
    async with lifespan(app), asgi_client(app) as client:
        health = (await client.get("/health")).json()
        embedded = (await client.post("/embed", json={"texts": json.loads(sys.argv[1])})).json()
    print(json.dumps({"health": health, "embedded": embedded,
                      "loaded": sorted(m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules)}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_controller_with_onnx_starts_without_torch(onnx_emb, home):
    """create_app + lifespan with the defaults (ONNX, the bundled model), in a fresh process so this
    one's imports do not count: torch, sentence-transformers and transformers stay unimported, and
    /embed answers the torch-tokenised ONNX path's vectors."""
    texts = [t for t in TEXTS + MORE_TEXTS if t.strip()]
    env = {k: v for k, v in os.environ.items() if k != "NEGSPACE_API_TOKEN"} | {
        "NEGSPACE_HOME": str(home), "HF_HUB_OFFLINE": "1", "CONTROLLER_DEVICE": "cpu", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", START_WITHOUT_TORCH, json.dumps(texts)], env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], out.stderr
    assert result["health"]["info"]["embed_backend"] == "onnx"
    assert "from its serving manifest, without torch" in out.stderr
    want, want_trunc = onnx_emb.encode(texts)
    np.testing.assert_allclose(np.asarray(result["embedded"]["embeddings"], np.float32), want, atol=1e-6)
    assert result["embedded"]["truncated"] == want_trunc


def damage_manifest(folder, damage: str) -> None:
    manifest, tok = folder / onnx_serve.MANIFEST_FILE, folder / onnx_serve.TOKENIZER_FILE
    if damage == "missing":
        manifest.unlink()
    elif damage == "not-json":
        manifest.write_text(manifest.read_text()[:100])
    elif damage == "wrong-vectors":
        m = json.loads(manifest.read_text())
        m["probe"]["vectors"][1] = [-x for x in m["probe"]["vectors"][1]]
        manifest.write_text(json.dumps(m))
    elif damage == "tokenizer-file":  # edited after the manifest was written
        tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    else:  # another tokenizer, its hash recorded: only the probe texts' token ids tell
        data = json.loads(tok.read_text())
        assert data["normalizer"]["lowercase"] is True
        data["normalizer"]["lowercase"] = False
        tok.write_text(json.dumps(data, ensure_ascii=False))
        m = json.loads(manifest.read_text())
        m["tokenizer_sha256"] = hashlib.sha256(tok.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(m))


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "why", "level"), [
    ("missing", "no serving manifest", logging.INFO),
    ("not-json", "no serving manifest", logging.INFO),
    ("wrong-vectors", "probe vectors differ from torch's", logging.WARNING),
    ("tokenizer-file", "is not the file the manifest was written with", logging.WARNING),
    ("tokenizer-ids", "token ids differ", logging.WARNING),
])
def test_missing_or_damaged_manifest_starts_through_torch_correctly(damage, why, level, onnx_emb, tmp_path,
                                                                    exports, caplog):
    """A copy of the cached export with its manifest damaged: the start goes through
    sentence-transformers (one line why, the cached graph reused), serves the same vectors, and
    writes the manifest again, so the next start is without torch."""
    folder = tmp_path / "onnx" / onnx_emb.onnx.path.parent.name
    shutil.copytree(onnx_emb.onnx.path.parent, folder)
    damage_manifest(folder, damage)
    with caplog.at_level(logging.INFO, "negspace.controller"):
        emb = build_embedder("", backend="onnx", device="cpu", onnx_dir=tmp_path / "onnx", batch_size=16)
    assert isinstance(emb, SentenceTransformerEmbedder) and emb.backend == "onnx" and exports == []
    assert emb.onnx.path == folder / "model.onnx"
    lines = [r for r in caplog.records if "starting through sentence-transformers" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0].getMessage() and lines[0].levelno == level, \
        [r.getMessage() for r in caplog.records]
    assert any("wrote the serving manifest" in r.getMessage() for r in caplog.records)
    want, want_trunc = onnx_emb.encode(TEXTS)
    got, got_trunc = emb.encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got_trunc == want_trunc
    again = manifest_embedder("", device="cpu", onnx_dir=tmp_path / "onnx", batch_size=16)
    assert isinstance(again, ManifestEmbedder)
    np.testing.assert_allclose(again.encode(TEXTS)[0], want, atol=1e-6)


@pytest.mark.slow
def test_manifest_setting_off_starts_through_torch(onnx_emb, home, caplog):
    with caplog.at_level(logging.INFO, "negspace.controller"):
        emb = build_embedder("", backend="onnx", device="cpu", manifest=False, onnx_dir=home / "models" / "onnx")
    assert isinstance(emb, SentenceTransformerEmbedder) and emb.backend == "onnx"
    assert not any("starting through" in r.getMessage() for r in caplog.records)
