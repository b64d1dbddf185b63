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
sampler order). An engine guides only the first ``guidance.max_tokens`` completion positions
(``GenerationRequest.guides_at``); after that it passes ``ln=None`` (plain generation).

Batched: ``guided_batch(logits, steps)`` and ``sample_batch(scores, steps)`` do this for ALL the
groups of a decoding step in one tensor pass on the logits' device (no per-group host copy; one
[G] host read of the drawn tokens per step, plus a scalar check or two). The draw is vLLM's exponential race
(``argmax(probs / q)``, ``q ~ Exp(1)``, i.e. a draw from ``probs``) with ``q`` from each group's
own seeded generator on the device. ``combine`` and ``sample`` are the same code for one group
(G = 1), so the transformers engine, the reference loop and the vLLM processor agree exactly.
``legacy_combine`` / ``legacy_sample`` are the former per-group host path, kept only for
``negspace_bench.node.bench_guidance``'s before/after comparison.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


COMBINES = ("min", "mean", "max")
_COMBINE_CODE = {"min": 0, "mean": 1, "max": 2}
FMAX = torch.finfo(torch.float32).max
#: A temperature below this is greedy (vLLM V1's ``_SAMPLING_EPS``): dividing by it would overflow.
SAMPLING_EPS = 1e-5


class NoFiniteScoreError(ValueError):
    """Every token of a row is forbidden or not a number (a broken model or processor): nothing can
    be drawn. Raised (or reported) for that request alone."""


@dataclass
class GroupStep:
    """One group at one decoding step: which logits rows are its members and how to decode.

    ``rows[0]`` is the positive, ``rows[1:]`` the negatives. ``guide`` False (plain generation,
    s = 1, no negatives, or past the guidance interval) ignores the negatives."""

    rows: Sequence[int]
    guide: bool = True
    scale: float = 1.0
    space: str = "logits"
    how: str = "min"
    alpha: float | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    generator: torch.Generator | None = None

    @property
    def guided(self) -> bool:
        return self.guide and len(self.rows) > 1 and self.scale != 1.0


def guided_batch(logits: torch.Tensor, steps: Sequence[GroupStep]) -> torch.Tensor:
    """Guided scores [G, V] (float32, on ``logits.device``) for every group of a step."""
    device = logits.device
    positives = torch.tensor([st.rows[0] for st in steps], dtype=torch.long, device=device)
    out = logits.index_select(0, positives).float()          # plain groups: lp itself
    chosen = [i for i, st in enumerate(steps) if st.guided]
    if not chosen:
        return out
    sub = [steps[i] for i in chosen]
    for st in sub:
        if st.space not in ("logits", "logprobs"):
            raise ValueError(f"unknown guidance space {st.space!r}")
        if st.how not in _COMBINE_CODE:
            raise ValueError(f"unknown guidance combine {st.how!r} (one of {', '.join(COMBINES)})")
    every = len(chosen) == len(steps)            # the common case: no copy in, no copy out
    idx = torch.tensor(chosen, dtype=torch.long, device=device)
    raw = out if every else out.index_select(0, idx)
    logprobs = [st.space == "logprobs" for st in sub]
    any_lp = any(logprobs)
    lp_mask = torch.tensor(logprobs, device=device).unsqueeze(1) if any_lp else None

    def space(x: torch.Tensor) -> torch.Tensor:
        return torch.where(lp_mask, torch.log_softmax(x, dim=-1), x) if any_lp else x

    lp = space(raw)
    # The negatives, combined element-wise in a FIXED order (negative 1, 2, ...): padding slots
    # add exactly nothing, so a group's result does not depend on the other groups in the batch.
    nmax = max(len(st.rows) - 1 for st in sub)
    hows = {st.how for st in sub}
    count = torch.tensor([float(len(st.rows) - 1) for st in sub], device=device).unsqueeze(1)
    lo = hi = total = None
    for k in range(nmax):
        valid = [k < len(st.rows) - 1 for st in sub]
        rows_k = torch.tensor([st.rows[1 + k] if ok else st.rows[1] for st, ok in zip(sub, valid, strict=True)],
                              dtype=torch.long, device=device)
        ln_k = space(logits.index_select(0, rows_k).float())
        v = torch.tensor(valid, device=device).unsqueeze(1)
        if "min" in hows:
            x = ln_k if all(valid) else torch.where(v, ln_k, torch.inf)
            lo = x if lo is None else torch.minimum(lo, x)
        if "max" in hows:
            x = ln_k if all(valid) else torch.where(v, ln_k, -torch.inf)
            hi = x if hi is None else torch.maximum(hi, x)
        if "mean" in hows:
            x = ln_k if all(valid) else torch.where(v, ln_k, 0.0)
            total = x if total is None else total + x
    parts = {how: acc for how, acc in (("min", lo), ("max", hi),
                                        ("mean", None if total is None else total / count)) if acc is not None}
    neg = parts[sub[0].how]
    if len(parts) > 1:              # groups of this step combine differently
        code = torch.tensor([_COMBINE_CODE[st.how] for st in sub], device=device).unsqueeze(1)
        for how, acc in parts.items():
            neg = torch.where(code == _COMBINE_CODE[how], acc, neg)
    # Finite by construction: a scale beyond float32's range would turn s * 0 into NaN, and a huge
    # s * (lp - ln) overflows to +-inf: the scale is capped at float32's largest value and the mix
    # saturates at +-FMAX (an extreme scale ranks by the sign of lp - ln; ties draw uniformly).
    scale = torch.tensor([min(st.scale, FMAX) for st in sub], dtype=torch.float32, device=device).unsqueeze(1)
    guided = torch.lerp(neg, lp, scale)             # neg + s * (lp - neg), one fused pass
    guided = torch.nan_to_num_(guided, nan=NEG_INF, posinf=FMAX, neginf=-FMAX)
    # -inf handling (a masked token; raw model logits are always finite, so this is rare and only
    # looked for with one reduction):
    # - where a negative forbids a token the positive allows, -inf + s*inf would be NaN (and
    #   argmax picks NaN): the negatives carry no information there, so keep the positive's score;
    # - where the positive forbids a token, keep it forbidden whatever the negatives say.
    if bool(torch.minimum(lp, neg).amin() == NEG_INF):
        guided = torch.where(torch.isneginf(neg) | torch.isneginf(lp), lp, guided)
    alphas = [st.alpha or 0.0 for st in sub]
    if any(alphas):
        # plausibility: softmax of the RAW positive (temperature 1); alpha 0 keeps everything
        probs = torch.softmax(raw, dim=-1)
        a = torch.tensor(alphas, dtype=torch.float32, device=device).unsqueeze(1)
        keep = probs >= a * probs.max(dim=-1, keepdim=True).values
        keep.scatter_(-1, raw.argmax(dim=-1, keepdim=True), True)
        guided = guided.masked_fill(~keep, NEG_INF)
    if every:
        return guided
    out.index_copy_(0, idx, guided)
    return out


def sample_batch(scores: torch.Tensor, steps: Sequence[GroupStep]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per group from scores [G, V]: (tokens [G] long, ok [G] bool), on the device.

    Temperature, then min-p, then top-p, then the draw (vLLM V1's sampler order), per group;
    ``temperature < SAMPLING_EPS`` is greedy. ``ok`` is False for a row with no finite score (its
    token is meaningless: fail that group). Nothing is copied to the host here."""
    scores = torch.nan_to_num(scores.float(), nan=NEG_INF, posinf=FMAX, neginf=NEG_INF)
    tokens = scores.argmax(dim=-1)
    ok = scores.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) > NEG_INF     # the best is finite
    hot = [i for i, st in enumerate(steps) if st.temperature >= SAMPLING_EPS]
    if not hot:
        return tokens, ok
    device = scores.device
    sub = [steps[i] for i in hot]
    idx = torch.tensor(hot, dtype=torch.long, device=device)
    x = scores.index_select(0, idx)
    temps = torch.tensor([st.temperature for st in sub], dtype=torch.float32, device=device).unsqueeze(1)
    x = (x - x.max(dim=-1, keepdim=True).values) / temps      # cannot overflow (see ``scaled``)
    min_ps = [st.min_p for st in sub]
    if any(m > 0 for m in min_ps):
        probs = torch.softmax(x, dim=-1)
        m = torch.tensor(min_ps, dtype=torch.float32, device=device).unsqueeze(1)
        x = x.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, NEG_INF)
    top_ps = [st.top_p for st in sub]
    if any(p < 1.0 for p in top_ps):
        x = _top_p_rows(x, torch.tensor(top_ps, dtype=torch.float32, device=device).unsqueeze(1))
    probs = torch.softmax(x, dim=-1)
    q = torch.empty_like(probs)
    for j, st in enumerate(sub):            # each group's own seeded stream, on the device
        q[j].exponential_(generator=st.generator)
    drawn = probs.div_(q).argmax(dim=-1)
    return tokens.index_copy(0, idx, drawn), ok


#: top-p looks at the best TOP_P_CANDIDATES tokens first (a partial sort); only a row whose
#: candidates do not reach its top_p mass (a very flat distribution) is sorted in full.
TOP_P_CANDIDATES = 1024


def _top_p_rows(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row: keep the smallest set of best tokens whose probability reaches ``p`` [G, 1]
    (rows with ``p >= 1`` unchanged); -inf elsewhere. Exact: a token outside the candidates is
    cut only when the candidates' mass already reaches ``p``, else that row is sorted in full."""
    k = min(TOP_P_CANDIDATES, x.shape[-1])
    lse = torch.logsumexp(x, dim=-1, keepdim=True)

    def cut(rows_x: torch.Tensor, sorted_x: torch.Tensor, order: torch.Tensor, lse_rows, p_rows):
        probs = torch.exp(sorted_x - lse_rows)
        before = probs.cumsum(dim=-1) - probs             # mass of the strictly better tokens
        kept = torch.full_like(rows_x, NEG_INF).scatter(-1, order, sorted_x.masked_fill(before >= p_rows, NEG_INF))
        return kept, probs.sum(dim=-1, keepdim=True)

    top, order = torch.topk(x, k, dim=-1)                 # sorted, best first
    out, mass = cut(x, top, order, lse, p)
    out = torch.where(p >= 1.0, x, out)
    short = ((mass < p) & (p < 1.0)).squeeze(1)
    if k < x.shape[-1] and bool(short.any()):
        rows = short.nonzero().squeeze(1)
        sub = x.index_select(0, rows)
        sorted_x, full_order = torch.sort(sub, dim=-1, descending=True)
        full, _ = cut(sub, sorted_x, full_order, lse.index_select(0, rows), p.index_select(0, rows))
        out.index_copy_(0, rows, full)
    return out


# -- one group (G = 1): the same code ---------------------------------------------------------
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
    rows = torch.cat([lp.unsqueeze(0), ln.to(lp.dtype)], dim=0)
    step = GroupStep(rows=range(rows.shape[0]), scale=scale, space=space, how=how, alpha=alpha)
    return guided_batch(rows, [step])[0]


def request_step(request, rows: Sequence[int], guide: bool, generator: torch.Generator | None) -> GroupStep:
    """The ``GroupStep`` of one group of a ``GenerationRequest`` (``guide``: guided this step)."""
    g = request.guidance
    return GroupStep(rows=rows, guide=guide, scale=g.scale, space=g.space, how=g.combine, alpha=g.alpha,
                     temperature=request.temperature, top_p=request.top_p, min_p=request.min_p,
                     generator=generator)


def guided_scores(request, lp: torch.Tensor, ln: torch.Tensor | None) -> torch.Tensor:
    """``combine`` with a ``GenerationRequest``'s guidance options (``ln=None``: plain)."""
    g = request.guidance
    return combine(lp, ln, g.scale, g.space, g.combine, g.alpha)


def sample(guided: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
           min_p: float = 0.0) -> int:
    """Draw one token from guided scores [V]: temperature, then min-p, then top-p, then the draw
    (vLLM V1's sampler order). ``temperature < SAMPLING_EPS`` (1e-5, vLLM's threshold; 0 included)
    is greedy (argmax): dividing by a smaller one would overflow. ``generator`` must live on
    ``guided``'s device."""
    step = GroupStep(rows=(0,), guide=False, temperature=temperature, top_p=top_p, min_p=min_p,
                     generator=generator)
    tokens, ok = sample_batch(guided.detach().unsqueeze(0), [step])
    if not bool(ok[0]):
        raise NoFiniteScoreError("no token has a finite score (NaN or -inf everywhere)")
    return int(tokens[0])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request, on ``device``: seeded requests are reproducible."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return g


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``; -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs          # mass of the strictly better tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf for tokens whose probability is < ``min_p`` x the top token's (vLLM's min-p)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


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


# -- the former per-group host path (bench_guidance's "before" only) ----------------------------
def legacy_combine(lp: torch.Tensor, ln: torch.Tensor | None, scale: float, space: str = "logits",
                   how: str = "min", alpha: float | None = None) -> torch.Tensor:
    """The per-group implementation ``combine`` replaced (same semantics, one group at a time)."""
    if ln is None or ln.shape[0] == 0 or scale == 1.0:
        return lp.float()
    raw = lp = lp.float()
    ln = ln.float()
    if space == "logprobs":
        lp = torch.log_softmax(lp, dim=-1)
        ln = torch.log_softmax(ln, dim=-1)
    neg = {"min": lambda: ln.min(dim=0).values, "mean": lambda: ln.mean(dim=0),
           "max": lambda: ln.max(dim=0).values}[how]()
    guided = torch.nan_to_num(neg + min(scale, FMAX) * (lp - neg), nan=NEG_INF, posinf=FMAX, neginf=-FMAX)
    guided = torch.where(torch.isneginf(neg), lp, guided)
    guided = torch.where(torch.isneginf(lp), lp, guided)
    if alpha:
        probs = torch.softmax(raw, dim=-1)
        keep = probs >= alpha * probs.max(dim=-1, keepdim=True).values
        keep.scatter_(-1, raw.argmax(dim=-1, keepdim=True), True)
        guided = guided.masked_fill(~keep, NEG_INF)
    return guided


def legacy_sample(guided: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                  min_p: float = 0.0) -> int:
    """The per-group host draw ``sample`` replaced: copy the row to the host, filter, multinomial
    with a CPU generator."""
    guided = sanitize(guided.detach().float().cpu())
    if temperature < SAMPLING_EPS:
        return int(torch.argmax(guided))
    logits = top_p_filter(min_p_filter(scaled(guided, temperature), min_p), top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
