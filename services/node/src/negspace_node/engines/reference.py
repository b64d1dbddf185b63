"""The naive reference loop: the oracle every engine is tested (and benchmarked) against.

Nothing clever on purpose: at every step each branch (the positive prompt and each negative,
each followed by the shared suffix sampled so far) is run through the model FROM SCRATCH,
alone, without padding and without a KV cache; the last-position logits are combined with
``negspace_node.guidance.combine`` (with the request's combine, alpha and guidance interval)
and one token is drawn with ``guidance.sample`` from a
generator seeded like the engines seed theirs. Quadratic in the output length: an oracle, not
an engine.

    from negspace_node.engines.reference import reference_generate
    out = reference_generate(model, tokenizer, GenerationRequest(prompt_ids=..., negative_ids=[...],
                                                                 guidance=Guidance(scale=3.0), temperature=0))
"""

from __future__ import annotations

import torch

from negspace_node.engines.base import GenerationOutput, GenerationRequest
from negspace_node.engines.stopping import StopChecker, eos_token_ids
from negspace_node.guidance import guided_scores, make_generator, sample


@torch.inference_mode()
def next_token_logits(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits of one unpadded sequence, computed from scratch."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    return model(input_ids=input_ids, use_cache=False).logits[0, -1, :]


def reference_generate(model, tokenizer, request: GenerationRequest, *, choice: int = 0,
                       eos_ids=None) -> GenerationOutput:
    """Decode choice ``choice`` of ``request`` the slow, obviously correct way.

    Choice ``i`` of a plain ``n > 1`` request uses seed ``seed + i`` (as the engines do).
    """
    if eos_ids is None:
        eos_ids = eos_token_ids(tokenizer, model.config, model.generation_config)
    seed = None if request.seed is None else request.seed + choice
    generator = make_generator(seed, model.device)
    checker = StopChecker(tokenizer, eos_ids, request.stop, request.max_tokens, len(request.prompt_ids))
    negatives = [list(n) for n in request.negative_ids] if request.guided else []
    suffix: list[int] = []
    while True:
        lp = next_token_logits(model, list(request.prompt_ids) + suffix)
        ln = (torch.stack([next_token_logits(model, n + suffix) for n in negatives])
              if negatives and request.guides_at(len(suffix)) else None)
        token = sample(guided_scores(request, lp, ln), request.temperature, request.top_p, generator,
                       request.min_p)
        suffix.append(token)
        if checker.add(token):
            return checker.output()
