"""The prompts a run sends and the batched, KV-cached decode that records the measures.

Prompts: ``prompt_texts`` builds the positive and the negatives with the orchestrator's own
functions (``negspace_orchestrator.prompts``, from a ``RunConfig`` with the variant's
``negative_format``), and ``Renderer`` turns them into token ids through the node's own request
path (``NodeService._chat_request``: the chat template, the user turn, the generation prompt), so
the check sees exactly the ids a run's node decodes.

Decode: for one base, the distinct prompts are prefilled once as one left-padded batch; the KV
cache is then copied out to every (variant, seed) group's rows, and each step is ONE forward pass
over every row (as the transformers engine does it). The guided scores are the node's
``guidance.guided_batch`` and the token is drawn with ``guidance.sample_batch`` from a generator
seeded like a request's, with the sampling options a run uses (T and top-p from ``RunConfig``'s
defaults); the measures are taken on the untruncated distributions (``measures``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from negspace_contracts.node import ChatCompletionRequest, ChatMessage
from negspace_contracts.orchestrator import RunConfig
from negspace_node.guidance import GroupStep, guided_batch, make_generator, sample_batch
from negspace_orchestrator import prompts

from negspace_bench.diagnose import measures


@dataclass(frozen=True)
class Variant:
    """One guidance configuration under test. ``fmt`` None: the sharpening control (no negatives;
    the positive's logits times the scale, i.e. the positive at temperature 1/s)."""

    name: str
    fmt: str | None
    how: str = "min"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("raw/min", "raw"),
    Variant("augment/min", "augment"),
    Variant("superset/min", "superset"),
    Variant("superset/max", "superset", "max"),
    Variant("superset/mean", "superset", "mean"),
    Variant("superset-list", "superset-list"),
    Variant("sharpen", None),
)}


def prompt_texts(base: str, existing: list[str], fmt: str | None) -> tuple[str, list[str]]:
    """(positive, negatives) as the orchestrator builds them for a slot whose chosen (dense)
    instructions are ``existing`` (``Rounds._generate`` and ``Rounds._choose_negatives``)."""
    cfg = RunConfig(base_instruction=base, negative_format=fmt or "raw")
    positive = prompts.positive_prompt(prompts.augmentation_prompt(cfg.augmentation_prompt), base)
    return positive, ([] if fmt is None else prompts.negative_prompts(cfg, existing, positive))


class Renderer:
    """Token ids through the node's own request path, around an engine (already loaded)."""

    def __init__(self, engine) -> None:
        from negspace_node.serving import NodeService
        from negspace_node.settings import NodeSettings
        from prometheus_client import CollectorRegistry

        if engine.state != "ready":
            asyncio.run(engine.start())
        self.service = NodeService(NodeSettings(), engine, CollectorRegistry())

    def ids(self, positive: str, negatives: list[str]) -> tuple[list[int], list[list[int]]]:
        # _chat_request is the node's one place that renders and encodes a chat request; the
        # check calls it rather than a copy of it, so a change there is tested here.
        request = self.service._chat_request(ChatCompletionRequest(
            messages=[ChatMessage(role="user", content=positive)], negative_prompts=negatives,
            max_tokens=1))
        return list(request.prompt_ids), [list(n) for n in request.negative_ids]

    def completion_ids(self, text: str) -> list[int]:
        """``text`` as the model would write it as (the start of) a completion."""
        return list(self.service.engine.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Group:
    """One (variant, seed) of one base: its rows in the decode batch and what it recorded."""

    variant: Variant
    seed: int
    prompts: list[int]                    # indices into the base's distinct prompts: [pos, *negs]
    rows: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=dict)
    alive: bool = True


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def decode_base(model, distinct: list[list[int]], groups: list[Group], *, x_ids: list[list[int]],
                x_specific: frozenset[int], scale: float, tokens: int, temperature: float, top_p: float,
                eos_ids: frozenset[int], pad_id: int) -> None:
    """Decode every group of one base for ``tokens`` steps (a group stops after its EOS) and fill
    each group's ``steps`` with the per-step measures and ``tokens`` with what it drew."""
    from transformers import DynamicCache

    device = model.device
    ids, mask = _left_pad(distinct, pad_id)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    row_prompt = []
    for g in groups:
        g.rows = list(range(len(row_prompt), len(row_prompt) + len(g.prompts)))
        row_prompt.extend(g.prompts)
    index = torch.tensor(row_prompt, dtype=torch.long, device=device)
    cache.batch_select_indices(index)          # each group's own copy of its prompts' cache
    mask = mask.to(device).index_select(0, index)
    logits = out.logits[:, -1, :].index_select(0, index)
    generators = [make_generator(g.seed, device) for g in groups]
    for t in range(tokens):
        steps = [GroupStep(rows=g.rows, guide=g.variant.fmt is not None, scale=scale, how=g.variant.how,
                           temperature=temperature, top_p=top_p, generator=gen)
                 for g, gen in zip(groups, generators, strict=True)]
        guided = guided_batch(logits, steps)
        lp = logits.index_select(0, torch.tensor([g.rows[0] for g in groups], device=device)).float()
        for i, g in enumerate(groups):
            if g.variant.fmt is None:
                guided[i] = lp[i] * scale
        found = measures.distribution_measures(lp, guided)
        copy = [measures.copy_next(g.tokens, x_ids) for g in groups]
        xs = [x_specific] * len(groups)
        found |= {"x_mass_pos": measures.mass(lp, xs), "x_mass_guided": measures.mass(guided, xs),
                  "copy_mass_pos": measures.mass(lp, copy), "copy_mass_guided": measures.mass(guided, copy)}
        drawn, ok = sample_batch(guided, steps)
        drawn_list = drawn.tolist()
        found = {k: v.tolist() for k, v in found.items()}
        for i, g in enumerate(groups):
            if not g.alive:
                continue
            for k, v in found.items():
                g.steps.setdefault(k, []).append(float(v[i]))
            g.tokens.append(int(drawn_list[i]))
            g.alive = bool(ok[i]) and drawn_list[i] not in eos_ids
        if t == tokens - 1 or not any(g.alive for g in groups):
            break
        next_ids = torch.tensor([[drawn_list[i]] for i, g in enumerate(groups) for _ in g.rows],
                                dtype=torch.long, device=device)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
