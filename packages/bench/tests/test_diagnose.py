"""The mechanism check's measures on hand-made logits, its prompts against the orchestrator's and
the node's, and its decode loop on a tiny random model (no download, a second or two)."""

from __future__ import annotations

import pytest
import torch
from negspace_bench.diagnose import decode, report
from negspace_bench.diagnose.instructions import EXISTING
from negspace_bench.diagnose.measures import (
    bootstrap_ci,
    copy_next,
    distribution_measures,
    mass,
    x_specific_ids,
)
from negspace_contracts.orchestrator import RunConfig
from negspace_node.engines.fake import FakeEngine
from negspace_node.guidance import combine
from negspace_node.testing import chat_ids
from negspace_orchestrator import prompts

BASE = "Write a poem."


def _logits(rows: int = 4, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_guided_equal_to_positive_changes_nothing():
    lp = _logits()
    found = distribution_measures(lp, lp.clone())
    assert torch.allclose(found["dh"], torch.zeros(4), atol=1e-5)
    assert torch.allclose(found["kl"], torch.zeros(4), atol=1e-5)
    assert found["lower"].sum() == 0
    ids = [[1, 2, 3]] * 4
    assert torch.allclose(mass(lp, ids), mass(lp.clone(), ids))


def test_pure_sharpening_lowers_entropy_at_every_step():
    lp = _logits(rows=16)
    found = distribution_measures(lp, 2.0 * lp)         # the positive at temperature 1/2
    assert bool((found["dh"] > 0).all()) and found["lower"].mean() == 1.0
    assert bool((found["kl"] > 0).all())


def test_a_negative_that_only_adds_x_pushes_away_from_x_and_leaves_the_rest():
    # neg = pos + a bump on token x (the superset form in the ideal case): guidance lowers x's
    # probability and leaves every other token's probability ratio unchanged.
    lp = _logits(rows=1)[0]
    x = int(lp.argmax())
    ln = lp.clone()
    ln[x] += 2.0
    guided = combine(lp, ln.unsqueeze(0), scale=2.0)
    assert mass(guided.unsqueeze(0), [[x]]) < mass(lp.unsqueeze(0), [[x]])
    rest = [i for i in range(lp.numel()) if i != x]
    assert torch.allclose(guided[rest] - lp[rest], torch.zeros(len(rest)), atol=1e-5)
    # whereas a negative sharing nothing (raw: zeros) is pure sharpening
    assert torch.allclose(combine(lp, torch.zeros_like(lp).unsqueeze(0), scale=2.0), 2.0 * lp)


def test_copy_next_follows_the_longest_match_in_each_x():
    xs = [[5, 6, 7, 8], [9, 6, 10]]
    assert copy_next([], xs) == {5, 9}                        # the first step: each X's first token
    assert copy_next([1, 6], xs) == {7, 10}                   # tail [6] occurs in both
    assert copy_next([5, 6], xs) == {7, 10}                   # [5, 6] in X1; [6] in X2
    assert copy_next([9, 6, 7], xs) == {8}                    # [6, 7] in X1; nothing in X2 (7 ends no match)
    assert copy_next([42], xs) == frozenset()
    assert copy_next([8], xs) == frozenset()                  # X's last token has no next token


def test_x_specific_ids_drop_what_the_positive_already_says():
    assert x_specific_ids([[1, 2, 3], [3, 4]], [2, 4, 99]) == {1, 3}


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 6) == (0.5, 0.5, 0.5)
    mean, lo, hi = bootstrap_ci([0.0, 1.0, 2.0, 3.0])
    assert lo <= mean == 1.5 <= hi


@pytest.mark.parametrize("fmt", ["raw", "augment", "superset", "superset-list"])
def test_prompts_are_the_orchestrators(fmt):
    xs = EXISTING[BASE][:3]
    positive, negatives = decode.prompt_texts(BASE, xs, fmt)
    cfg = RunConfig(base_instruction=BASE, negative_format=fmt)
    assert positive == prompts.positive_prompt(prompts.augmentation_prompt(None), BASE)
    assert negatives == prompts.negative_prompts(cfg, xs, positive)
    if fmt == "superset":
        assert all(n.startswith(positive) and n.endswith(x) for n, x in zip(negatives, xs, strict=True))
    if fmt == "superset-list":
        assert len(negatives) == 1 and all(x in negatives[0] for x in xs)
    assert decode.prompt_texts(BASE, xs, None) == (positive, [])


def test_renderer_ids_are_the_nodes_chat_rendering():
    renderer = decode.Renderer(FakeEngine())
    positive, negatives = decode.prompt_texts(BASE, EXISTING[BASE][:2], "superset")
    pos, negs = renderer.ids(positive, negatives)
    tok = renderer.service.engine.tokenizer
    assert pos == chat_ids(tok, positive)
    assert negs == [chat_ids(tok, n) for n in negatives]


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def _decode(model, scale: float, tokens: int = 5):
    renderer = decode.Renderer(FakeEngine())
    xs = EXISTING[BASE][:2]
    distinct, groups = [], []
    for variant in decode.VARIANTS.values():
        pos, negs = renderer.ids(*decode.prompt_texts(BASE, xs, variant.fmt))
        rows = []
        for seq in [pos, *negs]:
            if seq not in distinct:
                distinct.append(seq)
            rows.append(distinct.index(seq))
        groups += [decode.Group(variant, seed, rows) for seed in (1, 2)]
    x_ids = [renderer.completion_ids(x) for x in xs]
    decode.decode_base(model, distinct, groups, x_ids=x_ids, x_specific=x_specific_ids(x_ids, []),
                       scale=scale, tokens=tokens, temperature=1.0, top_p=0.9, eos_ids=frozenset(), pad_id=0)
    return groups


def test_decode_at_scale_one_is_plain_and_sharpen_lowers_entropy(tmp_path):
    model = _tiny_model()
    for g in _decode(model, scale=1.0):
        assert len(g.tokens) == 5 and len(g.steps["dh"]) == 5
        assert max(abs(v) for v in g.steps["dh"]) < 1e-5 and max(g.steps["kl"]) < 1e-5
    groups = _decode(model, scale=2.0)
    sharpen = [g for g in groups if g.variant.name == "sharpen"]
    assert all(v > 0 for g in sharpen for v in g.steps["dh"])
    units = [{"base": BASE, "seed": g.seed, "variant": g.variant.name, "steps": g.steps,
              "means": report.unit_means(g.steps)} for g in groups]
    summary = report.summarize(units, list(decode.VARIANTS), reps=50)
    assert summary["table"]["sharpen"]["lower"]["mean"] == 1.0
    assert set(summary["paired_vs_augment"]) == set(decode.VARIANTS) - {"augment/min"}
    assert len(summary["dh_per_step"]["raw/min"]) == 5
    report.write(tmp_path, summary, {"scale": 2.0, "bases": [BASE]}, units)
    assert {p.name for p in tmp_path.iterdir()} == {"diagnose.json", "diagnose.md", "dh_per_step.png"}
    assert "| sharpen | 2 | 10 |" in (tmp_path / "diagnose.md").read_text()
