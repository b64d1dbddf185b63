"""Classifier-free guidance with several negative prompts: the exact math, in one place.

Every engine calls these functions, so the vLLM engine, the transformers engine and the naive
reference loop compute the same numbers and draw the same token for the same seed.

At each decoding step, for one group (a positive prompt and its negatives sharing a suffix):

    lp     = next-token logits of [positive + suffix]                    shape [V]
    ln_i   = next-token logits of [negative_i + suffix]                  shape [N, V]
    ln     = min_i ln_i            (element-wise; ``how`` = "mean" or "max" instead of min)
    guided = ln + s * (lp - ln)    s = guidance scale; s = 1 is plain generation
    guided = -inf where softmax(lp) < alpha * max softmax(lp)     (optional plausibility cut)

Where a negative's score is -inf (a masked token) the positive's score is kept; where the
positive's is -inf the token stays forbidden. ``space="logprobs"`` applies log-softmax to lp and every ln_i first (the CFG paper's
formulation); ``"logits"`` (the reference method, default) mixes raw logits.
Temperature, then min-p, then top-p apply to ``guided`` and one token is drawn (vLLM V1's
sampler order). An engine guides only the first ``guidance_max_tokens`` completion positions
(``GenerationRequest.guides_at``); after that it passes ``ln=None`` (plain generation).
"""

from __future__ import annotations

import random

import torch

NEG_INF = float("-inf")


COMBINES = ("min", "mean", "max")
FMAX = torch.finfo(torch.float32).max
#: A temperature below this is greedy (vLLM V1's ``_SAMPLING_EPS``): dividing by it would overflow.
SAMPLING_EPS = 1e-5


def combine(lp: torch.Tensor, ln: torch.Tensor | None, scale: float, space: str = "logits",
            how: str = "min", alpha: float | None = None) -> torch.Tensor:
    """Guided next-token scores for one group. ``lp``: [V]; ``ln``: [N, V] (or None/empty).

    ``how`` combines the negatives element-wise (``min``, ``mean`` or ``max``); ``alpha`` is the
    plausibility restriction: tokens whose probability under the positive alone (softmax of the
    raw ``lp``) is below ``alpha`` x the positive's top probability get -inf (None or 0 = off;
    the positive's top token always survives). With no negatives or ``scale == 1`` this is plain
    generation: ``lp`` itself, no restriction.
    """
    if ln is None or ln.shape[0] == 0 or scale == 1.0:
        # s = 1 is plain generation; returning lp itself keeps it bit-identical to it.
        return lp.float()
    raw = lp = lp.float()
    ln = ln.float()
    if space == "logprobs":
        lp = torch.log_softmax(lp, dim=-1)
        ln = torch.log_softmax(ln, dim=-1)
    elif space != "logits":
        raise ValueError(f"unknown guidance space {space!r}")
    if how == "min":
        neg = ln.min(dim=0).values
    elif how == "mean":
        neg = ln.mean(dim=0)
    elif how == "max":
        neg = ln.max(dim=0).values
    else:
        raise ValueError(f"unknown guidance combine {how!r} (one of {', '.join(COMBINES)})")
    # Finite by construction: a scale beyond float32's range would turn s * 0 into NaN, and a huge
    # s * (lp - ln) overflows to +-inf: the scale is capped at float32's largest value and the mix
    # saturates at +-FMAX (an extreme scale ranks by the sign of lp - ln; ties draw uniformly).
    guided = neg + min(scale, FMAX) * (lp - neg)
    guided = torch.nan_to_num(guided, nan=NEG_INF, posinf=FMAX, neginf=-FMAX)
    # -inf handling (a masked token; raw model logits are always finite):
    # - where a negative forbids a token the positive allows, -inf + s*inf would be NaN (and
    #   argmax picks NaN): the negatives carry no information there, so keep the positive's score;
    # - where the positive forbids a token, keep it forbidden whatever the negatives say.
    guided = torch.where(torch.isneginf(neg), lp, guided)
    guided = torch.where(torch.isneginf(lp), lp, guided)
    if alpha:
        guided = plausible(raw, guided, alpha)
    return guided


def guided_scores(request, lp: torch.Tensor, ln: torch.Tensor | None) -> torch.Tensor:
    """``combine`` with a ``GenerationRequest``'s guidance options (``ln=None``: plain)."""
    return combine(lp, ln, request.guidance_scale, request.guidance_space, request.guidance_combine,
                   request.guidance_alpha)


def plausible(lp: torch.Tensor, guided: torch.Tensor, alpha: float) -> torch.Tensor:
    """``guided`` with -inf wherever softmax(lp) < alpha x max softmax(lp); the argmax of lp stays."""
    probs = torch.softmax(lp.float(), dim=-1)
    keep = probs >= alpha * probs.max(dim=-1, keepdim=True).values
    keep.scatter_(-1, lp.argmax(dim=-1, keepdim=True), True)
    return guided.masked_fill(~keep, NEG_INF)


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


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf for tokens whose probability is < ``min_p`` x the top token's (vLLM's min-p)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


def sample(guided: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
           min_p: float = 0.0) -> int:
    """Draw one token from guided scores [V]: temperature, then min-p, then top-p, then the draw
    (vLLM V1's sampler order). ``temperature < SAMPLING_EPS`` (1e-5, vLLM's threshold; 0 included)
    is greedy (argmax): dividing by a smaller one would overflow."""
    guided = sanitize(guided.detach().float().cpu())
    if temperature < SAMPLING_EPS:
        return int(torch.argmax(guided))
    logits = top_p_filter(min_p_filter(scaled(guided, temperature), min_p), top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class NoFiniteScoreError(ValueError):
    """Every token of a row is forbidden or not a number (a broken model or processor): nothing can
    be drawn. Raised for that request alone."""


def sanitize(scores: torch.Tensor) -> torch.Tensor:
    """NaN becomes -inf (forbidden), +inf becomes FMAX; refuse a row with nothing finite left."""
    scores = torch.nan_to_num(scores, nan=NEG_INF, posinf=FMAX, neginf=NEG_INF)
    ok = (scores > NEG_INF).any(dim=-1)
    if not bool(ok.all()):
        raise NoFiniteScoreError("no token has a finite score (NaN or -inf everywhere)")
    return scores


def scaled(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scores / temperature`` without overflow: the top score is subtracted first (softmax is
    unchanged), so every finite score maps to a value <= 0 and the top token to exactly 0."""
    return (scores - scores.max(dim=-1, keepdim=True).values) / temperature
