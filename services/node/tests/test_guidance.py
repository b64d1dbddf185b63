"""The guidance math on fixed tensors: what every engine computes."""

import math

import pytest
import torch
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
