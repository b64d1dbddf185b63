"""The measures of the mechanism check: pure functions on logits and token ids (no model).

At one decoding step, with the shared suffix ``y`` sampled so far from the guided distribution:

- ``p`` = softmax of the positive's raw logits, ``q`` = softmax of the guided scores, both at
  temperature 1 and without top-p (the distributions themselves, not what a sampler cuts).
- ``h_pos`` = H(p), ``h_guided`` = H(q) in nats; ``dh = h_pos - h_guided`` (> 0: guidance
  sharpened this step) and ``lower = 1[h_guided < h_pos]``.
- ``kl`` = KL(q || p) in nats: how far the distribution tokens are drawn from moved away from the
  positive's.
- ``x_mass``: the probability mass on the X-specific token ids: every token id of the existing
  instructions X (each encoded as it would appear in a completion) that does NOT occur in the
  positive prompt's text. Tokens the base and the augmentation request already use ("Write", " a",
  " problem") belong to the positive, so only the pull toward what X adds is counted.
- ``copy_mass``: the mass on the tokens that would continue a copy of some X (``copy_next``): for
  each X, the longest tail of ``y`` (>= 1 token) that occurs in X, and the token after each such
  occurrence; at the first step, X's first token. Empty (mass 0) where no X matches.

Every mass is reported for both ``p`` and ``q``; the check reports ``q - p``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def distribution_measures(lp: torch.Tensor, guided: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row of [G, V] positive logits and guided scores: h_pos, h_guided, dh, lower, kl ([G] each)."""
    logp = torch.log_softmax(lp.float(), dim=-1)
    logq = torch.log_softmax(guided.float(), dim=-1)
    h_pos, h_guided = _entropy(logp), _entropy(logq)
    q = logq.exp()
    kl = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1)
    return {"h_pos": h_pos, "h_guided": h_guided, "dh": h_pos - h_guided,
            "lower": (h_guided < h_pos).float(), "kl": kl.clamp(min=0.0)}


def mass(logits: torch.Tensor, id_sets: Sequence[Iterable[int]]) -> torch.Tensor:
    """Probability mass (softmax at temperature 1) of row g of [G, V] ``logits`` on ``id_sets[g]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    mask = torch.zeros_like(probs, dtype=torch.bool)
    for g, ids in enumerate(id_sets):
        ids = list(ids)
        if ids:
            mask[g, torch.tensor(ids, dtype=torch.long)] = True
    return (probs * mask).sum(-1)


def x_specific_ids(x_ids: Sequence[Sequence[int]], prompt_ids: Iterable[int]) -> frozenset[int]:
    """The token ids of the X's that the positive prompt does not contain."""
    return frozenset(t for x in x_ids for t in x) - frozenset(prompt_ids)


def copy_next(suffix: Sequence[int], x_ids: Sequence[Sequence[int]]) -> frozenset[int]:
    """The next tokens of a copy of any X given the sampled ``suffix`` (see the module doc)."""
    out: set[int] = set()
    for x in x_ids:
        if not x:
            continue
        if not suffix:
            out.add(x[0])
            continue
        for m in range(min(len(suffix), len(x) - 1), 0, -1):
            tail = list(suffix[-m:])
            found = [x[j + m] for j in range(len(x) - m) if list(x[j:j + m]) == tail]
            if found:
                out.update(found)
                break
    return frozenset(out)


def bootstrap_ci(values: Sequence[float], *, reps: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(reps, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
