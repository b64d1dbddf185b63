"""The ONNX Runtime backend of the real embedder: the torch path's vectors and truncation flags, an
export made once and reused, safe under a concurrent second constructor, re-made when the cached
file is corrupt or wrong, and torch (one log line) for pipelines it does not support."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_controller import onnx_embed
from negspace_controller.embedding import bundled_model_path
from negspace_controller.onnx_embed import OnnxEncoder, OnnxUnsupported, unsupported_reason
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


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_onnx_vectors_and_truncation_equal_torch(torch_emb, onnx_emb, batch_size, monkeypatch):
    assert (onnx_emb.backend, torch_emb.backend) == ("onnx", "torch")
    assert (onnx_emb.name, onnx_emb.dimension, onnx_emb.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    lengths = [len(ids) for ids in torch_emb.model.tokenizer(TEXTS, truncation=False)["input_ids"]]
    assert (lengths[4], lengths[5]) == (256, 257)  # the boundary: 256 tokens fit, 257 do not
    for emb in (torch_emb, onnx_emb):
        monkeypatch.setattr(emb, "batch_size", batch_size)
    got, got_trunc = onnx_emb.encode(TEXTS)
    want, want_trunc = torch_emb.encode(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 384) and got.dtype == np.float32
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
