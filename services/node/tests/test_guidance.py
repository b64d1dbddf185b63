"""The guidance math on fixed tensors: what every engine computes."""

import math

import pytest
import torch
from negspace_contracts.node import Guidance
from negspace_node.guidance import combine, make_generator, sample, top_p_filter

NEG_INF = float("-inf")


def test_min_over_negatives_then_mix():
    lp = torch.tensor([2.0, 0.0, 1.0])
    ln = torch.tensor([[1.0, 3.0, 0.0],
                       [4.0, -1.0, 0.5]])
    # element-wise min of the negatives: [1, -1, 0]; guided = ln + 2 * (lp - ln)
    assert torch.equal(combine(lp, ln, 2.0), torch.tensor([3.0, 1.0, 2.0]))
    # s = 0 gives the negatives' min itself
    assert torch.equal(combine(lp, ln, 0.0), torch.tensor([1.0, -1.0, 0.0]))


def test_scale_one_and_no_negatives_are_identity():
    lp = torch.tensor([0.3, -1.2, 5.0])
    ln = torch.tensor([[9.0, 9.0, 9.0]])
    assert torch.equal(combine(lp, ln, 1.0), lp)
    assert torch.equal(combine(lp, None, 4.0), lp)
    assert torch.equal(combine(lp, torch.empty(0, 3), 4.0), lp)


def test_logprobs_space_normalises_each_branch_first():
    lp = torch.tensor([1.0, 2.0, 3.0])
    ln = torch.tensor([[0.0, 0.0, 10.0]])
    expected = torch.log_softmax(ln[0], -1) + 3.0 * (torch.log_softmax(lp, -1) - torch.log_softmax(ln[0], -1))
    assert torch.allclose(combine(lp, ln, 3.0, "logprobs"), expected)
    # shifting a branch's logits changes nothing in logprobs space, but does in logits space
    assert torch.allclose(combine(lp + 7, ln - 3, 3.0, "logprobs"), expected, atol=1e-5)
    assert not torch.allclose(combine(lp + 7, ln - 3, 3.0, "logits"), combine(lp, ln, 3.0, "logits"))
    with pytest.raises(ValueError, match="guidance space"):
        combine(lp, ln, 2.0, "probs")


def test_minus_infinity_handling():
    lp = torch.tensor([NEG_INF, 1.0, 2.0, 0.0])
    ln = torch.tensor([[0.0, NEG_INF, 1.0, 0.0],
                       [0.0, 0.0, 1.0, 0.0]])
    out = combine(lp, ln, 3.0)
    assert out[0] == NEG_INF                 # forbidden by the positive: stays forbidden
    assert out[1] == 1.0                     # a negative forbids it: no information, positive's score kept
    assert not torch.isnan(out).any()        # -inf + s*inf would be NaN, and argmax would pick NaN
    assert out[2] == pytest.approx(1.0 + 3.0 * (2.0 - 1.0))
    assert sample(out, 0.0, 1.0, make_generator(0)) == 2
    assert {sample(out, 1.0, 1.0, make_generator(s)) for s in range(30)} <= {1, 2, 3}
    # the same in logprobs space (log-softmax keeps -inf where the logits were -inf)
    out = combine(lp, ln, 3.0, "logprobs")
    assert out[0] == NEG_INF and torch.isfinite(out[1:]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = top_p_filter(logits, 0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # order-independent: a shuffled vocabulary keeps the same tokens
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(top_p_filter(logits[perm], 0.7)).tolist() == [False, True, False, True]


def test_sample_greedy_seeded_and_top_p():
    scores = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(scores, 0.0, 1.0, make_generator(1)) == 1
    draws = [sample(scores, 1.0, 1.0, make_generator(7)) for _ in range(3)]
    assert len(set(draws)) == 1                                  # same seed, same token
    many = {sample(scores, 1.0, 1.0, make_generator(s)) for s in range(40)}
    assert many >= {1, 3}                                        # different seeds explore
    narrow = {sample(scores, 1.0, 0.4, make_generator(s)) for s in range(40)}  # p(best)=0.48
    assert narrow == {1}                                         # top-p 0.4 keeps only the best
    assert not math.isnan(float(torch.softmax(scores, -1).sum()))


def test_combine_mean_and_max_over_negatives():
    lp = torch.tensor([2.0, 0.0, 1.0])
    ln = torch.tensor([[1.0, 3.0, 0.0],
                       [4.0, -1.0, 0.5]])
    # mean of the negatives: [2.5, 1, 0.25]; max: [4, 3, 0.5]; guided = ln + 2 * (lp - ln)
    assert torch.allclose(combine(lp, ln, 2.0, how="mean"), torch.tensor([1.5, -1.0, 1.75]))
    assert torch.equal(combine(lp, ln, 2.0, how="max"), torch.tensor([0.0, -3.0, 1.5]))
    # in logprobs space each branch is normalised before combining
    lpl, lnl = torch.log_softmax(lp, -1), torch.log_softmax(ln, -1)
    mean = lnl.mean(0)
    assert torch.allclose(combine(lp, ln, 3.0, "logprobs", "mean"), mean + 3.0 * (lpl - mean))
    # one negative: min, mean and max agree
    for how in ("min", "mean", "max"):
        assert torch.allclose(combine(lp, ln[:1], 2.5, how=how), combine(lp, ln[:1], 2.5))
    with pytest.raises(ValueError, match="guidance combine"):
        combine(lp, ln, 2.0, how="median")


def test_plausibility_alpha_cuts_what_the_positive_finds_implausible():
    # positive probabilities: [0.6, 0.3, 0.08, 0.02] -> alpha 0.1 keeps p >= 0.06: tokens 0, 1, 2
    lp = torch.log(torch.tensor([0.6, 0.3, 0.08, 0.02]))
    ln = torch.log(torch.tensor([[0.7, 0.29, 0.009, 0.001]]))
    free = combine(lp, ln, 4.0)
    assert int(free.argmax()) == 3                     # guidance alone favours an implausible token
    cut = combine(lp, ln, 4.0, alpha=0.1)
    assert torch.isfinite(cut).tolist() == [True, True, True, False]
    assert torch.equal(cut[:3], free[:3])              # the survivors keep their guided scores
    assert int(cut.argmax()) == 2
    assert sample(cut, 0.0, 1.0, make_generator(0)) == 2
    assert {sample(cut, 1.0, 1.0, make_generator(s)) for s in range(50)} <= {0, 1, 2}
    # the restriction uses the RAW positive (temperature 1), in either space, and shifts nothing
    assert torch.equal(torch.isfinite(combine(lp + 5, ln, 4.0, "logprobs", alpha=0.1)), torch.isfinite(cut))
    # alpha 1 keeps only the positive's top token, even when guidance ranks it last
    assert torch.isfinite(combine(lp, ln, 50.0, alpha=1.0)).tolist() == [True, False, False, False]
    # off: None or 0; and no restriction without guidance (s = 1 or no negatives is plain)
    assert torch.equal(combine(lp, ln, 4.0, alpha=0.0), free)
    assert torch.equal(combine(lp, ln, 1.0, alpha=0.5), lp)
    assert torch.equal(combine(lp, None, 4.0, alpha=0.5), lp)


def test_min_p_applies_after_temperature_and_before_top_p():
    from negspace_node.guidance import min_p_filter, scaled

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(min_p_filter(logits, 0.25)).tolist() == [True, True, True, False]  # >= 0.125
    assert torch.isfinite(min_p_filter(logits, 0.7)).tolist() == [True, False, False, False]
    assert torch.equal(min_p_filter(logits, 0.0), logits)
    # after temperature: at T = 3 the distribution flattens and token 3 (0.05) passes min_p 0.25
    assert torch.isfinite(min_p_filter(logits / 3.0, 0.25)).all()
    draws_hot = {sample(logits, 3.0, 1.0, make_generator(s), min_p=0.25) for s in range(200)}
    assert 3 in draws_hot
    draws = {sample(logits, 1.0, 1.0, make_generator(s), min_p=0.25) for s in range(200)}
    assert draws == {0, 1, 2}
    # min_p first, then top-p renormalised over the survivors: min_p 0.25 leaves [0.5, 0.3, 0.15]
    # (renormalised 0.526, 0.316, 0.158); top-p 0.8 then keeps 0 and 1 only (0.526 < 0.8)
    assert {sample(logits, 1.0, 0.8, make_generator(s), min_p=0.25) for s in range(200)} == {0, 1}
    # the same draw as filtering by hand in that order, for the same seed
    by_hand = top_p_filter(min_p_filter(scaled(logits, 0.7), 0.2), 0.9)
    for seed in range(10):       # the draw is the exponential race argmax(probs / q), q ~ Exp(1)
        q = torch.empty(4).exponential_(generator=make_generator(seed))
        want = int((torch.softmax(by_hand, -1) / q).argmax())
        assert sample(logits, 0.7, 0.9, make_generator(seed), min_p=0.2) == want
    assert sample(logits, 0.0, 1.0, make_generator(0), min_p=0.9) == 0       # greedy ignores it


def test_guidance_max_tokens_is_a_guidance_interval():
    from negspace_node.engines.base import GenerationRequest

    r = GenerationRequest(prompt_ids=[1], negative_ids=[[2]], guidance=Guidance(scale=3.0, max_tokens=3))
    assert r.guided and [r.guides_at(p) for p in range(5)] == [True, True, True, False, False]
    always = GenerationRequest(prompt_ids=[1], negative_ids=[[2]], guidance=Guidance(scale=3.0))
    assert all(always.guides_at(p) for p in range(100))
    never = GenerationRequest(prompt_ids=[1], negative_ids=[[2]], guidance=Guidance(scale=3.0, max_tokens=0))
    assert not never.guided and not never.guides_at(0)          # N = 0: plain generation throughout
    plain = GenerationRequest(prompt_ids=[1], negative_ids=[[2]], guidance=Guidance(scale=1.0, max_tokens=5))
    assert not plain.guides_at(0)


@pytest.mark.parametrize("scale", [1e30, 1e38, 1e300, 1.7976931348623157e308])
@pytest.mark.parametrize("space", ["logits", "logprobs"])
@pytest.mark.parametrize("how", ["min", "mean", "max"])
def test_extreme_scales_give_finite_scores_and_a_draw(scale, space, how):
    torch.manual_seed(0)
    lp = torch.randn(500) * 5
    ln = torch.randn(3, 500) * 5
    ln[:, 7] = lp[7]                       # lp - ln == 0 somewhere: s * 0 must not become NaN
    out = combine(lp, ln, scale, space, how)
    assert not torch.isnan(out).any() and not torch.isinf(out).any()
    # the ranking is that of lp - ln where it saturates: the top token is one the positive favours
    neg = {"min": ln.min(0).values, "mean": ln.mean(0), "max": ln.max(0).values}[how]
    if space == "logits":
        assert (lp - neg)[int(out.argmax())] > 0
    for temperature in (0.0, 1e-30, 1e-6, 1e-5, 0.5, 2.0):
        for top_p, min_p in ((1.0, 0.0), (0.9, 0.1), (1e-9, 1.0)):
            token = sample(out, temperature, top_p, make_generator(1), min_p)
            assert 0 <= token < 500
    # alpha keeps working at saturation
    assert torch.isfinite(combine(lp, ln, scale, space, how, alpha=0.5)).sum() >= 1


def test_tiny_temperatures_are_greedy_and_huge_scores_do_not_overflow():
    scores = torch.tensor([0.0, 3.0, 1.0, 2.9])
    for t in (1e-30, 1e-10, 9.9e-6):
        assert {sample(scores, t, 1.0, make_generator(s)) for s in range(20)} == {1}
    # at the threshold it samples again (and at t = 1e-5 the best token still dominates)
    assert sample(scores, 1e-5, 1.0, make_generator(0)) == 1
    big = torch.tensor([3e38, -3e38, 1e38, float("inf")])
    assert {sample(big, 2.0, 1.0, make_generator(s)) for s in range(20)} <= {0, 3}


def test_a_row_with_nothing_finite_is_refused_not_drawn():
    from negspace_node.guidance import NoFiniteScoreError

    for row in (torch.full((4,), float("nan")), torch.full((4,), NEG_INF)):
        for t in (0.0, 1.0):
            with pytest.raises(NoFiniteScoreError):
                sample(row, t, 1.0, make_generator(0))
    # a NaN among finite scores is just a forbidden token
    assert {sample(torch.tensor([float("nan"), 1.0, 0.5]), 1.0, 1.0, make_generator(s))
            for s in range(30)} <= {1, 2}


def _mixed_steps(seed_base: int = 0):
    """12 groups of 1-5 rows with every option mixed, over a [R, V] batch (rows interleaved)."""
    from negspace_node.guidance import GroupStep

    g = torch.Generator().manual_seed(42)
    sizes = [1, 2, 3, 4, 5, 2, 3, 1, 4, 2, 5, 3]
    order = torch.randperm(sum(sizes), generator=g).tolist()      # members anywhere in the batch
    steps, at = [], 0
    for i, size in enumerate(sizes):
        rows = order[at:at + size]
        at += size
        steps.append(GroupStep(rows=rows, guide=i % 5 != 4, scale=[3.0, 0.0, 1.0, 7.5, 1e30][i % 5],
                               space=["logits", "logprobs"][i % 2], how=["min", "mean", "max"][i % 3],
                               alpha=[None, 0.1, 0.0, 0.5][i % 4],
                               temperature=[0.0, 1.0, 0.7, 1e-30][i % 4], top_p=[1.0, 0.9, 0.5][i % 3],
                               min_p=[0.0, 0.05][i % 2], generator=make_generator(seed_base + i)))
    logits = torch.randn(sum(sizes), 1000, generator=g) * 4
    logits[3, :10] = NEG_INF
    return logits, steps


def test_batched_pass_equals_each_group_alone_bit_for_bit():
    """A group's scores and its draw do not depend on the other groups of the step."""
    from negspace_node.guidance import guided_batch, sample_batch

    logits, steps = _mixed_steps()
    scores = guided_batch(logits, steps)
    tokens, ok = sample_batch(scores, steps)
    assert ok.all()
    _, fresh = _mixed_steps()                      # the same seeds, untouched generators
    for i, st in enumerate(fresh):
        alone = guided_batch(logits, [st])
        assert torch.equal(alone[0], scores[i]), i
        t, _ = sample_batch(alone, [st])
        assert int(t[0]) == int(tokens[i]), i


def test_batched_scores_equal_the_former_per_group_path():
    """Same semantics as the per-group implementation it replaced (legacy_combine), and the same
    greedy token; sampled draws use the exponential race now, so only their support is compared."""
    from negspace_node.guidance import guided_batch, legacy_combine, legacy_sample, sample_batch

    logits, steps = _mixed_steps()
    scores = guided_batch(logits, steps)
    tokens, _ = sample_batch(scores, steps)
    for i, st in enumerate(steps):
        lp, ln = logits[st.rows[0]], logits[list(st.rows[1:])]
        old = legacy_combine(lp, ln if st.guide else None, st.scale, st.space, st.how, st.alpha)
        assert torch.equal(torch.isfinite(old), torch.isfinite(scores[i])), i
        assert torch.allclose(old[torch.isfinite(old)], scores[i][torch.isfinite(old)], rtol=1e-5, atol=1e-4), i
        if st.temperature < 1e-5:
            assert int(tokens[i]) == legacy_sample(old, st.temperature, st.top_p, make_generator(0), st.min_p)
        else:
            assert torch.isfinite(scores[i][int(tokens[i])])


def test_batched_draws_follow_the_distribution():
    """The exponential race draws from softmax(scores / T) after min-p and top-p."""
    from negspace_node.guidance import GroupStep, sample_batch

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    steps = [GroupStep(rows=(0,), guide=False, temperature=1.0, generator=make_generator(s)) for s in range(4000)]
    tokens, _ = sample_batch(scores, steps)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    for st in steps:
        st.top_p = 0.7                   # keeps tokens 0 and 1: renormalised 0.625 / 0.375
    tokens, _ = sample_batch(scores, steps)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(float(freq[0]) - 0.625) < 0.03


def test_partial_sort_top_p_equals_a_full_sort():
    """The candidate (top-k) top-p keeps exactly the tokens a full sort keeps, on peaked rows (cut
    inside the candidates) and flat rows (candidates short of the mass: the full-sort fallback)."""
    import negspace_node.guidance as guidance

    g = torch.Generator().manual_seed(5)
    peaked = torch.randn(6, 5000, generator=g) * 6
    flat = torch.randn(4, 5000, generator=g) * 0.01
    x = torch.cat([peaked, flat])
    p = torch.tensor([0.9, 0.5, 0.99, 1.0, 0.1, 0.95, 0.9, 0.5, 1.0, 0.3]).unsqueeze(1)
    fast = guidance._top_p_rows(x, p)
    for i in range(x.shape[0]):
        want = top_p_filter(x[i], float(p[i]))
        assert torch.equal(torch.isfinite(fast[i]), torch.isfinite(want)), i
        assert torch.equal(fast[i][torch.isfinite(want)], x[i][torch.isfinite(want)])
    assert torch.isfinite(fast[6:]).sum(-1).min() > guidance.TOP_P_CANDIDATES   # flat rows: fallback used
