"""Classifier-free guidance with several negative prompts: the exact math, in one place.

Every engine calls these functions, so the vLLM engine, the transformers engine and the naive
reference loop compute the same numbers and draw the same token for the same seed.

At each decoding step, for one group (a positive prompt and its negatives sharing a suffix):

    lp     = next-token logits of [positive + suffix]                    shape [V]
    ln_i   = next-token logits of [negative_i + suffix]                  shape [N, V]
    ln     = min_i ln_i            (element-wise)
    guided = ln + s * (lp - ln)    s = guidance scale; s = 1 is plain generation

Where a negative's score is -inf (a masked token) the positive's score is kept; where the
positive's is -inf the token stays forbidden. ``space="logprobs"`` applies log-softmax to lp and every ln_i first (the CFG paper's
formulation); ``"logits"`` (the reference method, default) mixes raw logits.
Temperature and top-p then apply to ``guided`` and one token is drawn.
"""

from __future__ import annotations

import random

import torch

NEG_INF = float("-inf")


def combine(lp: torch.Tensor, ln: torch.Tensor | None, scale: float, space: str = "logits") -> torch.Tensor:
    """Guided next-token scores for one group. ``lp``: [V]; ``ln``: [N, V] (or None/empty)."""
    if ln is None or ln.shape[0] == 0 or scale == 1.0:
        # s = 1 is plain generation; returning lp itself keeps it bit-identical to it.
        return lp.float()
    lp = lp.float()
    ln = ln.float()
    if space == "logprobs":
        lp = torch.log_softmax(lp, dim=-1)
        ln = torch.log_softmax(ln, dim=-1)
    elif space != "logits":
        raise ValueError(f"unknown guidance space {space!r}")
    neg = ln.min(dim=0).values
    guided = neg + scale * (lp - neg)
    # -inf handling (a masked token; raw model logits are always finite):
    # - where a negative forbids a token the positive allows, -inf + s*inf would be NaN (and
    #   argmax picks NaN): the negatives carry no information there, so keep the positive's score;
    # - where the positive forbids a token, keep it forbidden whatever the negatives say.
    guided = torch.where(torch.isneginf(neg), lp, guided)
    return torch.where(torch.isneginf(lp), lp, guided)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded requests are reproducible."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return g


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``; -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs          # mass of the strictly better tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(0, order, sorted_logits)


def sample(guided: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one token from guided scores [V]. ``temperature == 0`` is greedy (argmax)."""
    guided = guided.detach().float().cpu()
    if temperature == 0.0:
        return int(torch.argmax(guided))
    logits = top_p_filter(guided / temperature, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
