"""A gang scheduler: the members of a guided group are admitted together and never split.

vLLM's V1 scheduler admits waiting requests first-come-first-served until the token budget,
the sequence slots or the free KV blocks run out, so a group could be cut across steps; and when
a running request needs a KV block and none is free it preempts the newest running request,
which could be one member of a group. ``GangScheduler`` prevents both:

- Admission whole or not at all: before each ``schedule()`` it walks the waiting queue in order,
  treating the members of one group (``SamplingParams.extra_args``, see ``groups.py``) as one
  unit and a plain request as a unit of one. A unit is admitted only if ALL of it fits: sequence
  slots (``max_num_seqs`` minus running), the token budget (its summed prompt lengths, with
  chunked prefill off) and KV blocks. Everything from the first unit that does not fit onward is
  held back for this step (strict FCFS: a large group is not starved by small requests behind
  it), then put back in the same order. A group whose members have not all arrived is held back.
- No preemption, by reservation: a unit is admitted only if the KV blocks that every running
  request and the unit may EVER need (prompt + max_tokens, rounded up to blocks, per KV cache
  group, ignoring prefix-cache sharing, so an upper bound) fit in the cache. Actual usage can
  then never exceed the cache, so vLLM never needs to preempt.
- Checks: after ``schedule()`` every group with a member scheduled must have all its members
  scheduled, and a preempted group member fails its group; violations are reported to
  ``groups.REPORTS`` (the engine fails that request with ``GuidanceGroupError``) and logged. The logits
  processor checks the same thing again from the batch it is given.

Needs ``enable_chunked_prefill=False``, ``async_scheduling=False`` and the FCFS policy.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from negspace_node.engines.vllm.groups import REPORTS, group_info, group_of

log = logging.getLogger("negspace.node.vllm")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GangScheduler(Scheduler):
    reports = REPORTS      # the scheduler runs in the engine's process (in-process engine core)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._kv_groups = max(1, len(self.kv_cache_config.kv_cache_groups))
        self._capacity_blocks = self.kv_cache_manager.block_pool.num_gpu_blocks - 1   # minus the null block
        self._max_len = self.vllm_config.model_config.max_model_len
        self.held_back_steps = 0        # steps in which a waiting unit had to wait (for tests/logs)

    # -- accounting ------------------------------------------------------------------------
    def lifetime_blocks(self, request) -> int:
        """KV blocks ``request`` can ever hold: prompt + max_tokens (capped by the context)."""
        tokens = min(request.num_prompt_tokens + request.max_tokens, self._max_len)
        return _cdiv(tokens, self.block_size) * self._kv_groups

    def _units(self, requests):
        """Consecutive admission units: a whole group (in order of first member) or one request."""
        units: list[list] = []
        by_group: dict[str, list] = {}
        for request in requests:
            member = group_of(request.sampling_params)
            if member is None:
                units.append([request])
                continue
            unit = by_group.get(member[0])
            if unit is None:
                unit = by_group[member[0]] = []
                units.append(unit)
            unit.append(request)
        return units

    def _admissible(self) -> int:
        """How many requests at the head of the waiting queue may be admitted whole this step."""
        slots = min(self.max_num_running_reqs, self.max_num_active_reqs) - len(self.running)
        tokens = self.max_num_scheduled_tokens - len(self.running)        # one decode token each
        free = self._capacity_blocks - sum(self.lifetime_blocks(r) for r in self.running)
        admitted = 0
        for unit in self._units(self.waiting):
            member = group_of(unit[0].sampling_params)
            if member is not None and len(unit) != member[2]:
                break                         # not all members have arrived: wait for them
            need_tokens = sum(r.num_tokens - r.num_computed_tokens for r in unit)
            need_blocks = sum(self.lifetime_blocks(r) for r in unit)
            if len(unit) > slots or need_tokens > tokens or need_blocks > free:
                break
            slots -= len(unit)
            tokens -= need_tokens
            free -= need_blocks
            admitted += len(unit)
        return admitted

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        held = []
        if self.waiting:
            admitted = self._admissible()
            waiting = list(self.waiting)
            held = waiting[admitted:]
            if held:
                self.held_back_steps += 1
                self.waiting.remove_requests(held)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for request in held:
                self.waiting.add_request(request)
        self._check_gangs(output)
        return output

    def _check_gangs(self, output) -> None:
        """Every group with a member scheduled has all its members scheduled: all ``size`` of them
        inside its guidance interval, the running ones past it (the engine aborted the negatives)."""
        scheduled = set(output.num_scheduled_tokens)
        if not scheduled:
            return
        seen: dict[str, list] = {}          # group id -> [scheduled, running, size, past the interval]
        for request in self.running:
            info = group_info(request.sampling_params)
            if info is None:
                continue
            entry = seen.setdefault(str(info["id"]), [0, 0, int(info["size"]), False])
            entry[0] += request.request_id in scheduled
            entry[1] += 1
            interval = info["guidance"].get("max_tokens")   # the group's Guidance (groups.group_args)
            if int(info["role"]) == 0 and interval is not None:
                entry[3] = request.num_output_tokens >= int(interval)
        for group_id, (count, running, size, past) in seen.items():
            expected = running if past else size
            if 0 < count < expected or (count and running < expected):
                reason = (f"scheduler split guidance group {group_id}: {count} of {expected} members in a step"
                          + ("" if running == expected else f" ({running} running)"))
                log.error("%s", reason)
                self.reports.report(group_id, reason)

    def _preempt_request(self, request, *args, **kwargs):
        member = group_of(request.sampling_params)
        if member is not None:
            reason = f"vLLM preempted a member of guidance group {member[0]} (KV cache exhausted)"
            log.error("%s", reason)
            self.reports.report(member[0], reason)
        return super()._preempt_request(request, *args, **kwargs)
