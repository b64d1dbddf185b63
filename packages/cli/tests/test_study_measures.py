"""negspace_cli.study.measures: known answers for the diversity measures, the validity heuristic
on labelled examples, quality rates, and (slow) the real evaluation embedder and the on-topic
bar's calibration."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
from negspace_cli.study import measures
from negspace_cli.study.measures import (
    CALIBRATION_RESULT,
    ON_TOPIC_BAR,
    Evaluator,
    calibrate,
    compression_ratio,
    diversity,
    load_calibration,
    looks_like_instruction,
    measure_set,
    quality,
)


def bow_encoder(dim: int = 256):
    """Bag-of-words hashing encoder: texts sharing words are similar (fast stand-in for a model)."""
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1.0
        return out

    encode.calls = calls
    return encode


# ------------------------------------------------------------------ evaluator

def test_evaluator_normalizes_and_embeds_each_text_once():
    enc = bow_encoder()
    ev = Evaluator.from_encoder(enc, name="bow")
    a = ev.embed(["write a poem", "write a story", "write a poem"])
    assert a.shape == (3, 256) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert np.array_equal(a[0], a[2])
    ev.embed(["write a story", "plan a trip"])
    assert [sorted(c) for c in enc.calls] == [["write a poem", "write a story"], ["plan a trip"]]
    assert ev.n_encoded == 3
    assert ev.embed([]).shape == (0, 256)


# ------------------------------------------------------------------ diversity

def test_vendi_known_answers():
    eye = np.eye(4, dtype=np.float32)
    assert diversity(list("abcd"), eye)["vendi"] == pytest.approx(4.0)
    same = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (5, 1))
    assert diversity(["x y"] * 5, same)["vendi"] == pytest.approx(1.0)
    # two clusters of two identical texts: effective number 2
    two = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    assert diversity(list("abcd"), two)["vendi"] == pytest.approx(2.0)


def test_vendi_comes_from_the_vendi_score_package():
    from vendi_score import vendi

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert diversity(list("abcdef"), x)["vendi"] == pytest.approx(vendi.score_X(x))


def test_mean_pairwise_distance():
    eye = np.eye(3, dtype=np.float32)
    assert diversity(list("abc"), eye)["mean_pairwise_distance"] == pytest.approx(1.0)
    same = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)
    assert diversity(list("abc"), same)["mean_pairwise_distance"] == pytest.approx(0.0, abs=1e-6)


def test_distinct_n_counts_over_the_set():
    texts = ["Write a poem", "write a story"]
    d = diversity(texts, np.eye(2))
    assert d["distinct_1"] == pytest.approx(4 / 6)        # write, a, poem, story / 6 tokens
    assert d["distinct_2"] == pytest.approx(3 / 4)        # (write a) twice, (a poem), (a story)


def test_compression_ratio_is_lower_for_diverse_sets():
    repetitive = ["Write a poem about the sea at night."] * 10
    varied = ["Write a poem about the sea at night.", "Plan a trip to Kyoto in spring.",
              "Explain entropy to a child.", "Draft an email declining a meeting.",
              "Give me a vegan lasagna recipe.", "Implement binary search in Rust.",
              "Summarize the causes of World War I.", "Design a logo for a bakery.",
              "Describe a sunrise over the desert.", "List five uses for baking soda."]
    assert compression_ratio(repetitive) > 2 * compression_ratio(varied)
    raw = " ".join(varied).encode()
    import gzip
    assert compression_ratio(varied) == pytest.approx(len(raw) / len(gzip.compress(raw, 9, mtime=0)))
    assert math.isnan(compression_ratio([]))


def test_self_bleu_direction():
    same = diversity(["write a poem about the sea"] * 3, np.eye(3))
    assert same["self_bleu"] == pytest.approx(1.0)
    diff = diversity(["write a poem about the sea", "plan a trip to kyoto now",
                      "explain entropy to a small child"], np.eye(3))
    assert diff["self_bleu"] < 0.2


def test_diversity_with_fewer_than_two_texts_is_nan_with_a_note():
    for texts in ([], ["only one text here"]):
        d = diversity(texts, np.ones((len(texts), 3)))
        assert d["n"] == len(texts) and "undefined" in d["note"]
        assert all(math.isnan(d[k]) for k in measures.DIVERSITY_KEYS)
        json.dumps(d)


# ------------------------------------------------------------------ validity

VALID = [
    "Write a sonnet about a lighthouse keeper's loneliness.",
    "Compose a haiku sequence about the four seasons.",
    "Explain quantum entanglement to a high-school student.",
    "Plan a seven-day road trip through Utah's national parks.",
    "Please write a limerick about a forgetful wizard.",
    "Could you draft an email to my landlord about the broken heater?",
    "What are the health benefits of green tea for older adults?",
    "How do vaccines train the immune system?",
    "You are a travel agent. Plan a honeymoon in Bali on a budget.",
    "I need a recipe for vegan lasagna that takes under an hour.",
    "I'd like you to write a bedtime story about a knitting dragon.",
    "Instruction: Write a Python function that flattens a nested list.",
    '"Create a four-week running plan for a beginner."',
    "**Write a product description for a leather wallet.**",
    "Help me write a toast for my sister's wedding.",
    "Imagine you are a pirate and describe your ship to a child.",
    "Give practical tips for getting out of credit card debt.",
    "In 100 words, describe a sunrise over the desert.",
]
INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("Write a poem.", "too_short"),
    ("Poem please", "too_short"),
    ("12345 67890 !!!! ???? ####", "non_letters"),
    ("Sure! Here is a poem about the sea for you:", "not_a_request"),
    ("Certainly! Here's a delicious recipe you can try tonight.", "not_a_request"),
    ("Here are five rewritten instructions for you.", "not_a_request"),
    ("As an AI language model, I cannot browse the internet.", "not_a_request"),
    ("Sorry, I can't help with that request today.", "not_a_request"),
    ("The answer is 42, as everyone knows by now.", "not_a_request"),
    ("Title: The Lonely Lighthouse by the Sea", "not_a_request"),
    ("Dear Ms. Patel, thank you for meeting with me.", "not_a_request"),
    ("Haha, that's a great point, thanks for sharing!", "not_a_request"),
    ("Thanks so much, you're the best!", "not_a_request"),
    ("def add(a, b): return a + b  # adds two numbers", "not_a_request"),
    ("I'm sorry, but I can't write that story.", "first_person"),
    ("I went to the store yesterday and bought apples.", "first_person"),
    ("I'd be happy to help you with that poem!", "first_person"),
    ("The moon hangs low above the silver bay.", "no_request"),
    ("Photosynthesis converts light energy into chemical energy.", "no_request"),
    ("Preheat the oven to 180 C and bake for 35 minutes.", "no_request"),
    ("This sleek bottle keeps drinks cold for 24 hours.", "no_request"),
    ("Roses are red\nviolets are blue\nsugar is sweet\nand so are you", "multi_line"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_instructions(text):
    assert looks_like_instruction(text) == (True, "ok")


@pytest.mark.parametrize("text, reason", INVALID)
def test_invalid_texts_and_their_reason(text, reason):
    assert looks_like_instruction(text) == (False, reason)


def test_validity_on_the_calibration_set():
    rows = load_calibration()
    hits = [looks_like_instruction(r["text"])[0] == r["valid"] for r in rows]
    assert np.mean(hits) >= 0.95


# ------------------------------------------------------------------ quality

def test_quality_rates_and_per_text_arrays():
    base_emb = np.array([1.0, 0.0])
    emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    texts = ["Write a sonnet about the sea at night.", "Write a haiku about autumn leaves falling.",
             "Plan a trip to Kyoto in the spring.", "Sure! Here is a poem for you:"]
    q = quality(texts, emb, "Write a poem.", base_emb, on_topic_bar=0.5)
    assert q["n"] == 4
    assert q["per_text"]["relevance"] == pytest.approx([1.0, 0.8, 0.0, 1.0])
    assert q["per_text"]["on_topic"] == [True, True, False, True]
    assert q["per_text"]["valid"] == [True, True, True, False]
    assert q["per_text"]["invalid_reason"] == ["", "", "", "not_a_request"]
    assert q["on_topic_rate"] == 0.75 and q["validity_rate"] == 0.75 and q["quality_rate"] == 0.5
    assert q["relevance_mean"] == pytest.approx(0.7)
    json.dumps(q)


def test_quality_flags_a_copy_of_the_base_and_handles_empty_sets():
    q = quality(["Write a poem about the sea."], np.array([[1.0, 0.0]]), "write a poem  about the sea.",
                np.array([1.0, 0.0]))
    assert q["per_text"]["invalid_reason"] == ["copy_of_base"] and q["quality_rate"] == 0.0
    empty = quality([], np.zeros((0, 2)), "Write a poem.", np.array([1.0, 0.0]))
    assert empty["n"] == 0 and math.isnan(empty["on_topic_rate"]) and empty["note"]


def test_measure_set_is_flat_and_serializable():
    ev = Evaluator.from_encoder(bow_encoder(), name="bow")
    texts = ["Write a poem about the sea at night.", "Write a poem about a lonely cat.",
             "Write a poem about autumn in the city.", "Sure! Here is a poem:"]
    m = measure_set(ev, texts, "Write a poem.", on_topic_bar=0.2)
    for key in ("n", "vendi", "mean_pairwise_distance", "compression_ratio", "distinct_1", "distinct_2",
                "self_bleu", "relevance_mean", "on_topic_rate", "validity_rate", "quality_rate",
                "n_quality", "vendi_quality", "on_topic_bar"):
        assert isinstance(m[key], (int, float)), key
    assert m["n"] == 4 and 1.0 <= m["vendi"] <= 4.0
    assert m["n_quality"] == 3 and 1.0 <= m["vendi_quality"] <= 3.0
    assert "calibrated for all-mpnet-base-v2" in m["notes"]
    json.dumps(m)
    one = measure_set(ev, ["Write a poem about the sea at night."], "Write a poem.")
    assert math.isnan(one["vendi"]) and math.isnan(one["vendi_quality"]) and one["notes"]


def test_calibration_set_shape():
    rows = load_calibration()
    bases = {r["base"] for r in rows}
    assert len(bases) == 10
    for base in bases:
        kinds = [r["kind"] for r in rows if r["base"] == base]
        assert kinds.count("rewrite") == 5
        assert sum(k in ("other_base", "answer", "chitchat") for k in kinds) == 5
    assert all(r["on_topic"] is None for r in rows if r["kind"] in ("answer_to_base", "preamble"))


# ------------------------------------------------------------------ the real embedder (slow)

@pytest.fixture(scope="module")
def mpnet():
    return Evaluator()


@pytest.mark.slow
def test_real_evaluator_embeds_768d_unit_vectors(mpnet):
    assert mpnet.name == "all-mpnet-base-v2" and not mpnet.is_controller_embedder
    e = mpnet.embed(["Write a poem.", "Compose a sonnet about the sea.", "What is the capital of France?"])
    assert e.shape == (3, 768) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


@pytest.mark.slow
def test_on_topic_bar_calibration_reproduces(mpnet):
    result = calibrate(mpnet)
    assert result["n_bar_rows"] == CALIBRATION_RESULT["n_bar_rows"]
    # the committed bar is as good as the best threshold on the labelled set
    assert result["bar_balanced_accuracy"] == pytest.approx(result["best_balanced_accuracy"], abs=1e-9)
    assert abs(result["best_bar"] - ON_TOPIC_BAR) < 0.02
    for key, recorded in (("bar_accuracy", "accuracy"), ("loo_base_accuracy", "loo_base_accuracy"),
                          ("quality_accuracy", "quality_accuracy"), ("validity_accuracy", "validity_accuracy")):
        assert result[key] == pytest.approx(CALIBRATION_RESULT[recorded], abs=0.011), key


def test_self_bleu_equals_the_sacrebleu_sentence_bleu_loop():
    import sacrebleu

    rng = np.random.default_rng(0)
    vocab = "write a poem story about the sea night cat dog city rain old new short long".split()
    for trial in range(6):
        n = int(rng.integers(2, 12))
        texts = [" ".join(rng.choice(vocab, size=int(rng.integers(1, 12)))) for _ in range(n)]
        if trial == 0:
            texts += texts[:2]                                  # exact duplicates
        if trial == 1:
            texts[0] = texts[0].upper() + " , !"               # case and punctuation
        loop = np.mean([sacrebleu.sentence_bleu(t, [u for j, u in enumerate(texts) if j != i],
                                                lowercase=True).score / 100 for i, t in enumerate(texts)])
        assert measures.self_bleu(texts) == pytest.approx(loop, abs=1e-12)
